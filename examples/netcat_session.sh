#!/usr/bin/env bash
# Replay the session of examples/netcat-session.md against a running trichat server, with nc.
#
#   HOST=127.0.0.1 PORT=7000 examples/netcat_session.sh
#
# Three people connect with their own `nc`: alice speaks JSON, bob plain text, dana registers
# an account. Every line typed is printed as `NAME> line`, every line received as
# `NAME< line`, in the order they happened. Timestamps and message ids differ from run to run.
#
# Settings (env): HOST (127.0.0.1), PORT (7000), STEP (seconds between typed lines, 0.5),
# SUFFIX (appended to the account name "dana", random by default because an account can be
# registered only once per server; set SUFFIX= for exactly "dana" on a fresh server).
# Needs: bash 4.1+, nc (Debian/Ubuntu: apt-get install netcat-openbsd), grep, sed.
set -euo pipefail

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-7000}
STEP=${STEP:-0.5}
SUFFIX=${SUFFIX-$RANDOM}
DANA="dana$SUFFIX"
# The id of a `send` must be new for that user name for a day, across connections: the server
# takes a send with a known id, recipient and text as a resend (protocol.md "Resending a send").
# So the ids of sends carry a random tag of this run.
RUN=$(printf '%04x%04x' "$RANDOM" "$RANDOM")

command -v nc >/dev/null || { echo "netcat_session.sh: needs nc" >&2; exit 1; }
nc -z "$HOST" "$PORT" 2>/dev/null || {
    echo "netcat_session.sh: no server at $HOST:$PORT (start one: trichat serve)" >&2
    exit 1
}

work=$(mktemp -d)
declare -A writer  # client name -> fd we type into
pids=()

cleanup() {
    for name in "${!writer[@]}"; do exec {writer[$name]}>&- || true; done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# open NAME: connect a new nc for NAME. What it receives is printed (and kept in a log file so
# later steps can pick message ids out of it).
open() {
    local name=$1
    mkfifo "$work/$name.in"
    : >"$work/$name.log"
    nc "$HOST" "$PORT" <"$work/$name.in" | while IFS= read -r line; do
        line=${line%$'\r'}  # text mode ends lines with CR LF
        printf '%5s< %s\n' "$name" "$line"
        printf '%s\n' "$line" >>"$work/$name.log"
    done &
    pids+=($!)
    # Keep the fifo open for writing, or nc would see end-of-input after the first line.
    exec {writer[$name]}>"$work/$name.in"
}

# say NAME LINE: type LINE into NAME's nc, then give the server time to answer.
say() {
    printf '%5s> %s\n' "$1" "$2"
    printf '%s\n' "$2" >&"${writer[$1]}"
    sleep "$STEP"
}

# close NAME: end NAME's input (nc exits once the server has closed its side).
close() {
    exec {writer[$1]}>&-
    unset "writer[$1]"
}

# last_msg NAME: the msg id of the last message NAME received (JSON mode).
last_msg() {
    grep '"type":"message"' "$work/$1.log" | tail -n 1 | sed -E 's/.*"msg":"([^"]+)".*/\1/'
}

note() { printf '\n# %s\n' "$*"; }

note "alice speaks JSON; before login only register, login and ping are served"
open alice
say alice '{"type":"ping","id":"p1"}'
say alice "{\"type\":\"send\",\"to\":\"bob\",\"text\":\"too early\",\"id\":\"$RUN-1\"}"
say alice '{"type":"login","user":"alice","id":2}'

note "bob types plain-text commands: his first line is not JSON"
open bob
say bob '/help'
say bob '/login bob'

note "a private message: stored, then sent; text mode counts it as received"
say alice "{\"type\":\"send\",\"to\":\"bob\",\"text\":\"hi bob\",\"id\":\"$RUN-3\"}"
say bob '/msg alice hello alice, how are you?'
say alice "{\"type\":\"read\",\"msg\":\"$(last_msg alice)\"}"

note "broadcast, typing, who is online"
say bob '/all hello everyone'
say alice '{"type":"typing","to":"bob"}'
say alice '{"type":"users","id":4}'
say alice '{"type":"status","user":"bob","id":5}'
say bob '/who'

note "bad input is answered, never fatal"
say alice "{\"type\":\"send\",\"to\":\"nobody\",\"text\":\"hi\",\"id\":\"$RUN-6\"}"
say alice "{\"type\":\"send\",\"to\":\"bob\",\"text\":5,\"id\":\"$RUN-7\"}"
say alice '{"type":"sned","id":8}'
say alice '{"type":"send",'
say alice '{"type":"login","user":"alice2","id":9}'
say bob 'hello?'
say bob '/msg bob'

note "dana registers an account, then leaves"
open dana
say dana "{\"type\":\"register\",\"user\":\"$DANA\",\"password\":\"short\",\"id\":1}"
say dana "{\"type\":\"register\",\"user\":\"$DANA\",\"password\":\"correct horse\",\"id\":2}"
say dana '{"type":"logout"}'
close dana

note "a message to an offline account is stored; resending with the same id is not a new message"
say alice "{\"type\":\"send\",\"to\":\"$DANA\",\"text\":\"are you there?\",\"id\":\"$RUN-10\"}"
say alice "{\"type\":\"send\",\"to\":\"$DANA\",\"text\":\"are you there?\",\"id\":\"$RUN-10\"}"
say alice "{\"type\":\"status\",\"user\":\"$DANA\",\"id\":11}"

note "dana logs in again (on a new connection): the stored message is offered; she acknowledges it"
rm -f "$work/dana.in"
open dana
say dana "{\"type\":\"login\",\"user\":\"$DANA\",\"id\":1}"
say dana "{\"type\":\"login\",\"user\":\"$DANA\",\"password\":\"correct horse\",\"id\":2}"
say dana "{\"type\":\"received\",\"msg\":\"$(last_msg dana)\"}"

note "bob leaves; guests get no stored messages"
say bob '/quit'
say alice "{\"type\":\"send\",\"to\":\"bob\",\"text\":\"still there?\",\"id\":\"$RUN-12\"}"
say dana '{"type":"logout"}'
say alice '{"type":"logout","id":13}'
close alice
close bob
close dana
wait

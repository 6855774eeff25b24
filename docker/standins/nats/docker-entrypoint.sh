#!/bin/sh
# Same contract as the official nats alpine image: when the first argument is a
# flag (or there is none), run nats-server with the arguments.
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- nats-server "$@"
fi
exec "$@"

#!/bin/sh
# Same contract as the official redis image's docker-entrypoint.sh.
set -e

# first arg is `-f` or `--some-option`, or `something.conf`
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ]; then
    # allow the container to be started with `--user`
    if [ "$(id -u)" = '0' ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
    fi
    # The official binary is built with protected mode off; Debian's is not.
    # Without a config file, turn it off so other containers can connect.
    case "${2:-}" in
        *.conf) ;;
        *) shift; set -- redis-server --protected-mode no "$@" ;;
    esac
fi

um="$(umask)"
if [ "$um" = '0022' ]; then
    umask 0077
fi

exec "$@"

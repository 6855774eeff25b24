#!/bin/sh
# Command of the Redis containers in docker-compose.yml: writes the ACL file from the
# environment (docker/redis/users.sh, passwords in $KAPPA_REDIS_<USER>_PASSWORD) and starts
# redis-server with it and the given arguments, through the image's entry point (which drops
# root for the redis user, so the file is handed to that user).
set -eu
umask 077
sh /etc/redis/users.sh > /tmp/users.acl
if id redis >/dev/null 2>&1; then chown redis:redis /tmp/users.acl; fi
exec docker-entrypoint.sh redis-server --aclfile /tmp/users.acl "$@"

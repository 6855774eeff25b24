#!/bin/sh
# Entry point of the Redis containers in docker-compose.yml: writes the ACL file from the
# environment (docker/redis/users.sh) and starts redis-server with it and the given arguments.
set -eu
umask 077
sh /etc/redis/users.sh > /tmp/users.acl
exec redis-server --aclfile /tmp/users.acl "$@"

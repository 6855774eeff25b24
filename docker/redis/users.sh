#!/bin/sh
# Writes the Redis ACL file of the project's users to stdout, with passwords from the
# environment ($KAPPA_REDIS_<USER>_PASSWORD). Each service may touch only its own keys:
#
#   user               keys                                  commands
#   default            none                                  PING only (health checks)
#   admin              all                                   all (operators, redis-cli)
#   temperature-delta  kappa:{temperature-delta:*            all but @dangerous (working state)
#   view-builder       views:*                               all but @dangerous (the views)
#   query-api          views:*                               reads and read-only scripts
#
# Used by docker-compose.yml (docker/redis/start.sh) and by integration-tests/tests/redis_acl.rs.
# A missing password is an error: no user is created without one. See docs/operations.md
# ("Redis users").
set -eu

pw() {
  var="KAPPA_REDIS_$(echo "$1" | tr 'a-z-' 'A-Z_')_PASSWORD"
  eval "val=\${$var:-}"
  if [ -z "$val" ]; then
    echo "users.sh: $var is not set" >&2
    exit 2
  fi
  case "$val" in
    *" "*) echo "users.sh: $var must not contain spaces" >&2; exit 2 ;;
  esac
  printf '%s' "$val"
}

echo "user default on nopass resetkeys -@all +ping"
echo "user admin on >$(pw admin) ~* &* +@all"
# A working-state key is kappa:{<service>:<partition>}:meta|state (one hash tag per partition).
echo "user temperature-delta on >$(pw temperature-delta) resetkeys ~kappa:{temperature-delta:* -@all +@read +@write +@scripting +@connection +@transaction -@dangerous"
echo "user view-builder on >$(pw view-builder) resetkeys ~views:* -@all +@read +@write +@scripting +@connection +@transaction -@dangerous"
# Reads go through one read-only Lua script (thermo_domain::views::READ_SCRIPT): a write in it
# is refused command by command.
echo "user query-api on >$(pw query-api) resetkeys ~views:* -@all +@read +@connection +eval +evalsha +script|load"

//! Connections to the servers under test: a NATS client with its JetStream context, and a
//! Redis connection, each with the URL in the error when it is not reachable.

use anyhow::Context;
use async_nats::jetstream;

/// Connects to NATS at `url` under the client name `name` (shown by the server's monitoring);
/// returns the client and its JetStream context.
pub async fn nats(
    url: &str,
    name: &str,
) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    // One URL or a comma-separated list of seeds (a cluster).
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("'{url}' is not a NATS URL or list of them"))?;
    let mut opts = async_nats::ConnectOptions::new().name(name);
    // `nats://user:password@host`: async-nats does not use a URL's user info by itself.
    if let Some((user, pass)) = addrs
        .iter()
        .find_map(|a| Some((a.username()?.to_string(), a.password()?.to_string())))
    {
        // Its own inboxes, named as the runtime names a service user's (`_INBOX_<user>`), the
        // only ones a user of docker/nats/permissions.conf may subscribe to.
        let who: String = user
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        opts = opts
            .user_and_password(user, pass)
            .custom_inbox_prefix(format!("_INBOX_{who}"));
    }
    let c = opts
        .connect(addrs)
        .await
        .with_context(|| format!("NATS at {url} is not reachable"))?;
    let js = jetstream::new(c.clone());
    Ok((c, js))
}

/// A multiplexed Redis connection to `url` (`redis://host:port[/db]` or `unix://path`).
pub async fn redis(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)
        .with_context(|| format!("bad Redis URL {url}"))?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("Redis at {url} is not reachable"))
}

/// Empties every database of the Redis server at `url` (`FLUSHALL`): scratch servers only.
///
/// Given up to two minutes: the client's default response timeout is far shorter, and emptying
/// 10^6 sensors' windows takes seconds (the growth benchmark's `affinity` run at 10^6 failed so).
pub async fn flushall(url: &str) -> anyhow::Result<()> {
    let mut r = redis(url).await?;
    r.set_response_timeout(std::time::Duration::from_secs(120));
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut r)
        .await
        .with_context(|| format!("FLUSHALL on {url}"))?;
    Ok(())
}

/// The NATS of `NATS_URL` (client and JetStream context), or `None` with a note on stderr that
/// `test` is skipped when `NATS_URL` is not set (`.ci/run` sets it). Panics if it is set but
/// not reachable: a test must not pass by not running.
pub async fn nats_from_env(test: &str) -> Option<(async_nats::Client, jetstream::Context)> {
    let Ok(url) = std::env::var("NATS_URL") else {
        eprintln!("note: NATS_URL not set; skipping the {test} test");
        return None;
    };
    let client = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("NATS_URL {url}: {e}"));
    let js = jetstream::new(client.clone());
    Some((client, js))
}

/// `prefix` followed by the current time in nanoseconds: a name (stream, namespace) no other
/// run of a test used.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{nanos}")
}

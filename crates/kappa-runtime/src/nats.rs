//! Connecting to NATS (one or several URLs, reconnecting, credentials from the environment) and
//! declaring streams idempotently: services declare what they need at start, never assume it.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::RuntimeError;
use crate::config::NatsArgs;

/// A connected client, its JetStream context and a connection-state flag for readiness.
#[derive(Clone)]
pub struct Nats {
    /// Core NATS client.
    pub client: async_nats::Client,
    /// JetStream context on it.
    pub js: jetstream::Context,
    connected: Arc<AtomicBool>,
    reconnects: tokio::sync::watch::Receiver<u64>,
}

/// Publish acks a connection's JetStream context lets be outstanding at once (async-nats's
/// default is 5,000, after which a publish *waits* for a permit).
///
/// Why more, and why the runtime still bounds its own: a permit is given back only when its ack
/// is awaited (or dropped), so a task that publishes many messages before awaiting any, or many
/// tasks doing so at once, can hold every permit and wait for one more: the whole process stops
/// publishing, for good. It happened: temperature-delta `local` with 10^5 sensors stalled after
/// its first snapshot (12,500 changed keys in one partition's flush), using no CPU and ignoring
/// SIGTERM (the final flush waited too). Every bulk publish of the runtime therefore keeps at
/// most [`PUBLISH_WINDOW`] acks outstanding per task, and the context's capacity leaves room for
/// `MAX_ACKS_IN_FLIGHT / PUBLISH_WINDOW` (256) such tasks at once: more partitions per instance
/// than any deployment runs.
pub const MAX_ACKS_IN_FLIGHT: usize = 65_536;

/// Most publish acks one task of the runtime leaves outstanding before it awaits the oldest
/// (see [`MAX_ACKS_IN_FLIGHT`]). A full default batch (256) still goes out as one pipeline.
pub const PUBLISH_WINDOW: usize = 256;

/// The publish acks one task leaves outstanding, at most a fixed number (the runtime's bulk
/// publishes use [`PUBLISH_WINDOW`]), each with a tag saying what it acknowledges: before each
/// publish, [`AckWindow::make_room`] hands back the oldest ack to await once the window is
/// full, and [`AckWindow::rest`] the ones left at the end, oldest first.
pub struct AckWindow<T> {
    acks: std::collections::VecDeque<(T, jetstream::context::PublishAckFuture)>,
    size: usize,
}

impl<T> AckWindow<T> {
    /// A window of at most `size` outstanding acks (at least one).
    pub fn new(size: usize) -> Self {
        Self {
            acks: std::collections::VecDeque::with_capacity(size.min(4096)),
            size: size.max(1),
        }
    }

    /// The oldest ack, to await before publishing again, if the window is full.
    pub fn make_room(&mut self) -> Option<(T, jetstream::context::PublishAckFuture)> {
        if self.acks.len() >= self.size {
            self.acks.pop_front()
        } else {
            None
        }
    }

    /// Records the ack of a publish just sent.
    pub fn push(&mut self, tag: T, ack: jetstream::context::PublishAckFuture) {
        self.acks.push_back((tag, ack));
    }

    /// The acks still outstanding, oldest first.
    pub fn rest(self) -> impl Iterator<Item = (T, jetstream::context::PublishAckFuture)> {
        self.acks.into_iter()
    }
}

/// The JetStream context of `client`, with [`MAX_ACKS_IN_FLIGHT`].
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
        .build(client)
}

impl Nats {
    /// Wraps a client connected elsewhere (a tool, a test). Its reconnections are not
    /// watched, so a [`crate::feed::Feed`] on it detects gaps by sequence and stream state only.
    pub fn from_client(client: async_nats::Client) -> Self {
        let (_, reconnects) = tokio::sync::watch::channel(0);
        Self {
            js: context(client.clone()),
            client,
            connected: Arc::new(AtomicBool::new(true)),
            reconnects,
        }
    }

    /// True while the client is connected (readiness).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Counts reconnections after a lost connection. A follower of a change stream watches it:
    /// whatever was published while the connection was down may never reach it, so a
    /// reconnection is a gap.
    pub fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reconnects.clone()
    }
}

/// The last permissions violation the server reported to this process, and when.
static LAST_REFUSAL: std::sync::Mutex<Option<(std::time::Instant, String)>> =
    std::sync::Mutex::new(None);

/// How long after a permissions violation a failed request is explained by it.
const REFUSAL_RELEVANCE: Duration = Duration::from_secs(30);

/// Remembers (and says) a permissions violation: the server reports it asynchronously, and the
/// request it refused only times out, so [`explain`] adds it to the error of that request.
fn record_refusal(msg: &str) {
    tracing::error!(refusal = %msg, "the NATS server refused a publish or subscription of this service");
    metrics::counter!("kappa_nats_permission_violations_total").increment(1);
    if let Ok(mut last) = LAST_REFUSAL.lock() {
        *last = Some((std::time::Instant::now(), msg.to_string()));
    }
}

/// `error`'s text, followed by the server's last permissions violation when one was reported
/// recently: a refused JetStream request otherwise fails only as "timed out".
pub fn explain(error: impl std::fmt::Display) -> String {
    let recent = LAST_REFUSAL.lock().ok().and_then(|last| {
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < REFUSAL_RELEVANCE)
            .map(|(_, m)| m.clone())
    });
    match recent {
        Some(m) => format!(
            "{error} (the server refused: {m}; check this service's NATS user and its permissions)"
        ),
        None => error.to_string(),
    }
}

/// Parses the comma-separated URL list, with a clear error for a bad entry.
pub fn parse_urls(urls: &str) -> Result<Vec<async_nats::ServerAddr>, RuntimeError> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        return Err(RuntimeError::Config("NATS_URL is empty".into()));
    }
    list.into_iter()
        .map(|u| {
            let addr = async_nats::ServerAddr::from_str(u).map_err(|e| {
                RuntimeError::Config(format!(
                    "NATS_URL '{}' is not a NATS URL: {e}",
                    crate::config::redacted(u)
                ))
            })?;
            match addr.scheme() {
                "nats" | "tls" | "ws" | "wss" => Ok(addr),
                other => Err(RuntimeError::Config(format!(
                    "NATS_URL '{}' has scheme '{other}'; expected nats://, tls://, ws:// or wss://",
                    crate::config::redacted(u)
                ))),
            }
        })
        .collect()
}

/// TLS as `args` asks for it: required with `NATS_CA` or a `tls://` URL, verified against
/// `NATS_CA` (or the system's roots), with a client certificate when `NATS_CERT` and
/// `NATS_KEY` are given. Unreadable files are configuration errors.
fn tls(
    mut opts: async_nats::ConnectOptions,
    args: &NatsArgs,
    addrs: &[async_nats::ServerAddr],
) -> Result<async_nats::ConnectOptions, RuntimeError> {
    let readable = |what: &str, p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|_| ())
            .map_err(|e| RuntimeError::Config(format!("{what} '{}': {e}", p.display())))
    };
    if let Some(ca) = &args.nats_ca {
        readable("NATS_CA", ca)?;
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    } else if addrs.iter().any(|a| a.scheme() == "tls") {
        opts = opts.require_tls(true);
    }
    match (&args.nats_cert, &args.nats_key) {
        (Some(cert), Some(key)) => {
            readable("NATS_CERT", cert)?;
            readable("NATS_KEY", key)?;
            opts = opts
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        (None, None) => {}
        _ => {
            return Err(RuntimeError::Config(
                "NATS_CERT and NATS_KEY go together (a client certificate and its key)".into(),
            ));
        }
    }
    Ok(opts)
}

/// Connects with the given name. Fails fast (within `nats_connect_timeout_secs`) when no server
/// answers at start; once connected, the client reconnects forever.
pub async fn connect(args: &NatsArgs, name: &str) -> Result<Nats, RuntimeError> {
    let addrs = parse_urls(&args.nats_url)?;
    let connected = Arc::new(AtomicBool::new(false));
    let flag = connected.clone();
    let (reconnected, reconnects) = tokio::sync::watch::channel(0u64);
    let was_lost = Arc::new(AtomicBool::new(false));
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(args.nats_connect_timeout_secs.max(1)))
        .event_callback(move |event| {
            let flag = flag.clone();
            let was_lost = was_lost.clone();
            let reconnected = reconnected.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        flag.store(true, Ordering::Relaxed);
                        if was_lost.swap(false, Ordering::Relaxed) {
                            reconnected.send_modify(|n| *n += 1);
                            metrics::counter!("kappa_nats_reconnects_total").increment(1);
                            tracing::info!("nats reconnected");
                        } else {
                            tracing::info!("nats connected");
                        }
                    }
                    async_nats::Event::ServerError(async_nats::ServerError::Other(msg))
                        if msg.to_ascii_lowercase().contains("permissions violation") =>
                    {
                        record_refusal(&msg);
                    }
                    async_nats::Event::Disconnected => {
                        flag.store(false, Ordering::Relaxed);
                        was_lost.store(true, Ordering::Relaxed);
                        tracing::warn!("nats disconnected");
                    }
                    other => tracing::debug!(event = %other, "nats event"),
                }
            }
        });
    if let Some(path) = &args.nats_creds {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| RuntimeError::Config(format!("NATS_CREDS '{}': {e}", path.display())))?;
    }
    let mut user = None;
    if let (Some(u), Some(pass)) = (&args.nats_user, &args.nats_password) {
        opts = opts.user_and_password(u.clone(), pass.clone());
        user = Some(u.clone());
    } else if let Some((u, pass)) = addrs
        .iter()
        .find_map(|a| Some((a.username()?.to_string(), a.password()?.to_string())))
    {
        // `nats://user:password@host` (async-nats does not use a URL's user info by itself).
        opts = opts.user_and_password(u.clone(), pass);
        user = Some(u);
    }
    // Its own inboxes, which the server's permissions can keep to this user.
    let inbox = match &args.nats_inbox_prefix {
        Some(p) => {
            crate::config::check_inbox_prefix(p)?;
            p.clone()
        }
        None => crate::config::default_inbox_prefix(user.as_deref(), name),
    };
    opts = opts.custom_inbox_prefix(inbox);
    if let Some(token) = &args.nats_token {
        opts = opts.token(token.clone());
    }
    let tls_on = args.nats_ca.is_some()
        || args.nats_cert.is_some()
        || addrs.iter().any(|a| a.scheme() == "tls");
    opts = tls(opts, args, &addrs)?;
    let shown = crate::config::redacted(&args.nats_url);
    let timeout = Duration::from_secs(args.nats_connect_timeout_secs.max(1) + 1);
    let client = tokio::time::timeout(timeout, opts.connect(addrs))
        .await
        .map_err(|_| RuntimeError::Nats(format!("no NATS server answered at {shown}")))?
        .map_err(|e| {
            let who = match (&args.nats_user, &args.nats_creds) {
                (Some(user), _) => format!(" as user '{user}'"),
                (None, Some(path)) => format!(" with credentials {}", path.display()),
                (None, None) => String::new(),
            };
            if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation {
                RuntimeError::Nats(format!(
                    "{shown} refused the connection{who}: authorization violation (check NATS_USER \
                     and NATS_PASSWORD, or NATS_CREDS)"
                ))
            } else if e.kind() == async_nats::ConnectErrorKind::Tls
                || (tls_on && e.to_string().to_ascii_lowercase().contains("certificate"))
            {
                RuntimeError::Nats(format!(
                    "cannot connect to {shown}{who}: TLS failed: {e} (check NATS_CA, and NATS_CERT \
                     and NATS_KEY if the server verifies clients)"
                ))
            } else {
                RuntimeError::Nats(format!("cannot connect to {shown}{who}: {e}"))
            }
        })?;
    connected.store(true, Ordering::Relaxed);
    let js = context(client.clone());
    Ok(Nats {
        client,
        js,
        connected,
        reconnects,
    })
}

/// An owner's change stream (e.g. a registry's): subjects `<prefix>.*` (entity id last), every
/// change kept, the last change of an entity readable by direct get, publishes deduplicated by
/// `Nats-Msg-Id` for two minutes. Observers replay it last-per-subject
/// ([`crate::observed`]). Plain data, like [`crate::partition::PartitionedStream`], so a domain
/// crate can name its streams without depending on the NATS client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeStream {
    /// Stream name, e.g. `SENSORS`.
    pub stream: String,
    /// Subject prefix of the changes, e.g. `registry.sensors`.
    pub prefix: String,
}

impl ChangeStream {
    /// The stream's configuration, with one replica.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{}.*", self.prefix)],
            allow_direct: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// [`ChangeStream::stream_config`] with `replicas` replicas.
    pub fn stream_config_with(&self, replicas: usize) -> stream::Config {
        stream::Config {
            num_replicas: replicas,
            ..self.stream_config()
        }
    }
}

/// JetStream's answers to a stream that asks for more replicas than the servers can place:
/// 10074 "replicas > 1 not supported in non-clustered mode" (a single server), 10005 "no
/// suitable peers for placement" (fewer JetStream servers up than replicas; measured with
/// nats-server 2.15.1: R5 on three nodes), 10023 "insufficient resources".
const REPLICAS_DO_NOT_FIT: [&str; 3] = ["10074", "10005", "10023"];

/// The stream's replica count as its configuration says (0 means 1).
fn replicas_of(config: &stream::Config) -> usize {
    config.num_replicas.max(1)
}

/// The refusal of a stream or bucket that exists with another replica count than
/// `KAPPA_REPLICAS` asks for. The runtime never changes it: moving a stream's replicas copies
/// its data between servers and several services declare the same streams, so an operator
/// does it once (`nats stream edit <name> --replicas <n>`).
pub fn replicas_differ(name: &str, existing: usize, wanted: usize) -> RuntimeError {
    RuntimeError::Config(format!(
        "stream {name} has {existing} replica(s) but KAPPA_REPLICAS={wanted}: it is left as it \
         is; set KAPPA_REPLICAS={existing}, or change the stream first with \
         `nats stream edit {name} --replicas {wanted}`"
    ))
}

/// Checks at start that `replicas` fits the servers behind `client`: a single nats-server (not
/// in a cluster) holds only one replica. A cluster's size is not known to a client (its INFO
/// lists the client URLs of the servers it is routed to now, fewer while one is down), so
/// there the server's answer to the first stream created is the check ([`declare_stream`]
/// turns it into one clear line).
pub fn check_replicas(client: &async_nats::Client, replicas: usize) -> Result<(), RuntimeError> {
    let info = client.server_info();
    match info.cluster.as_deref() {
        None if replicas > 1 => Err(RuntimeError::Config(format!(
            "KAPPA_REPLICAS={replicas} does not fit: nats-server {} is a single server, not in \
             a cluster, and holds 1 replica only (set KAPPA_REPLICAS=1, or connect to a \
             JetStream cluster of at least {replicas} servers)",
            info.server_name
        ))),
        None => Ok(()),
        Some(cluster) => {
            let servers = info.connect_urls.len();
            if servers > 0 && servers < replicas {
                tracing::warn!(
                    cluster,
                    servers,
                    replicas,
                    "fewer servers of the cluster are up than KAPPA_REPLICAS: streams created now will be refused"
                );
            } else {
                tracing::info!(cluster, servers, replicas, "connected to a NATS cluster");
            }
            Ok(())
        }
    }
}

/// Attempts at a JetStream declaration that timed out.
const DECLARE_ATTEMPTS: u32 = 3;

/// Runs a declaration (a stream or bucket created if missing) again when it timed out, up to
/// `DECLARE_ATTEMPTS` times. Two instances declaring the same replicated stream at once is
/// normal at start, and nats-server 2.15.1 answers neither the second create nor an update
/// sent while the first create is in flight: both time out after 5 s (measured on a 3-node
/// cluster with two concurrent requests); asked again, the stream exists and the answer comes
/// at once.
pub async fn retry_timeouts<T, E, F, Fut>(mut declare: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match declare().await {
            Err(e) if attempt < DECLARE_ATTEMPTS && e.to_string().contains("timed out") => {
                tracing::warn!(error = %e, attempt, "a declaration timed out; asking again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Declares a stream: creates it when missing, otherwise keeps the existing one (and logs when
/// its subjects differ from what this service expects). An existing stream with another
/// replica count than `config.num_replicas` is refused ([`replicas_differ`]); a stream whose
/// replicas the servers cannot place fails with one line naming `KAPPA_REPLICAS`.
pub async fn declare_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, RuntimeError> {
    let name = config.name.clone();
    let subjects = config.subjects.clone();
    let wanted = replicas_of(&config);
    let mut s = retry_timeouts(|| js.get_or_create_stream(config.clone()))
        .await
        .map_err(|e| {
            let text = e.to_string();
            if REPLICAS_DO_NOT_FIT.iter().any(|code| text.contains(code)) {
                RuntimeError::Config(format!(
                    "KAPPA_REPLICAS={wanted} does not fit the cluster: creating stream {name} was \
                 refused: {text}"
                ))
            } else {
                RuntimeError::JetStream(format!("declare stream {name}: {e}"))
            }
        })?;
    let info = s.info().await.map_err(RuntimeError::js)?;
    if info.config.subjects != subjects {
        tracing::warn!(stream = %name, existing = ?info.config.subjects, expected = ?subjects,
            "stream exists with other subjects; keeping it");
    }
    let existing = replicas_of(&info.config);
    if existing != wanted {
        return Err(replicas_differ(&name, existing, wanted));
    }
    Ok(s)
}

/// The stream sequence of a message delivered by a consumer, or 0 if it has no JetStream info.
pub fn stream_seq(msg: &jetstream::Message) -> u64 {
    msg.info().map(|i| i.stream_sequence).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers `timeouts` time-outs, then `last`, counting the attempts.
    async fn attempts(timeouts: u32, last: Result<u32, String>) -> (Result<u32, String>, u32) {
        let calls = std::cell::Cell::new(0u32);
        let r = retry_timeouts(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            let last = last.clone();
            async move {
                if n <= timeouts {
                    Err("jetstream request timed out".to_string())
                } else {
                    last
                }
            }
        })
        .await;
        (r, calls.get())
    }

    #[tokio::test]
    async fn a_declaration_that_timed_out_is_asked_again_three_times_at_most() {
        assert_eq!(attempts(0, Ok(7)).await, (Ok(7), 1));
        assert_eq!(attempts(2, Ok(7)).await, (Ok(7), 3));
        let (r, n) = attempts(5, Ok(7)).await;
        assert!(r.is_err_and(|e| e.contains("timed out")));
        assert_eq!(n, DECLARE_ATTEMPTS);
        // Any other error is the answer: not asked again.
        assert_eq!(
            attempts(0, Err("no suitable peers for placement".into())).await,
            (Err("no suitable peers for placement".into()), 1)
        );
    }

    #[test]
    fn a_stream_config_says_one_replica_by_default() {
        let change = ChangeStream {
            stream: "SENSORS".into(),
            prefix: "registry.sensors".into(),
        };
        assert_eq!(replicas_of(&change.stream_config()), 1);
        assert_eq!(replicas_of(&change.stream_config_with(3)), 3);
        let refused = replicas_differ("DLQ", 3, 1).to_string();
        assert!(
            refused.contains("DLQ has 3 replica(s) but KAPPA_REPLICAS=1"),
            "{refused}"
        );
    }
}

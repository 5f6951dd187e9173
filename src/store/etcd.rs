//! The production backend: etcd's v3 API through `etcd-client`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions,
    DeleteOptions, EventType, GetOptions, Identity, KvClient, PutOptions, TlsOptions,
    Txn as EtcdTxn, TxnOp as EtcdTxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    Compare, Datastore, EventKind, KeyValue, LeaseId, Listing, Revision, StoreError, StoreResult,
    Txn, TxnOp, TxnOutcome, Watch, WatchEvent, prefix_range_end,
};

/// Keys fetched per range request when listing; keeps each response far below gRPC's
/// message size limit however many keys a prefix holds.
const LIST_PAGE: i64 = 2000;

/// How a watch waits between attempts to re-establish itself while etcd is unreachable.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Connection settings for [`EtcdStore`].
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// etcd user and password, when the cluster has authentication enabled.
    pub credentials: Option<(String, String)>,
    /// TLS to `https://` endpoints.
    pub tls: Option<EtcdTls>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            credentials: None,
            tls: None,
        }
    }
}

/// Client TLS for etcd, as calicoctl configures it: the CA that signed the members'
/// certificates (`etcdCACertFile`) and, for a cluster started with `--client-cert-auth`, this
/// client's certificate and key (`etcdCertFile`, `etcdKeyFile`), all PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    /// Certificate and key files.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// Reads and checks the files: each must be readable PEM of the right kind, and the
    /// client certificate must be within its validity period. Errors name the file.
    fn load(&self) -> StoreResult<TlsOptions> {
        let ca = read_pem("etcdCACertFile", &self.ca_file, "CERTIFICATE")?;
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert_file, key_file)) = &self.identity {
            let cert = read_pem("etcdCertFile", cert_file, "CERTIFICATE")?;
            check_validity(cert_file, &cert)?;
            let key = read_pem("etcdKeyFile", key_file, "PRIVATE KEY")?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(tls)
    }
}

fn read_pem(field: &str, path: &Path, kind: &str) -> StoreResult<Vec<u8>> {
    let invalid = |reason: String| StoreError::Invalid {
        key: field.into(),
        reason: format!("{}: {reason}", path.display()),
    };
    let bytes = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(kind) {
        return Err(invalid(format!("no PEM {kind} in it")));
    }
    Ok(bytes)
}

/// An expired (or not yet valid) client certificate fails the handshake with a message that
/// does not say which file: say it here.
fn check_validity(path: &Path, pem: &[u8]) -> StoreResult<()> {
    let invalid = |reason: String| StoreError::Invalid {
        key: "etcdCertFile".into(),
        reason: format!("{}: {reason}", path.display()),
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let cert = block
        .parse_x509()
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(invalid(format!(
            "the certificate expired on {}",
            validity.not_after
        )));
    }
    if now < validity.not_before {
        return Err(invalid(format!(
            "the certificate is not valid before {}",
            validity.not_before
        )));
    }
    Ok(())
}

/// A [`Datastore`] on a real etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to the given endpoints (`http://host:port`). The connection is made lazily
    /// by the first request; an unreachable cluster shows as [`StoreError::Unavailable`].
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> StoreResult<Self> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid {
                key: "etcdEndpoints".into(),
                reason: "no etcd endpoints given".into(),
            });
        }
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        match (&options.tls, https) {
            (Some(_), n) if n != endpoints.len() => {
                return Err(StoreError::Invalid {
                    key: "etcdEndpoints".into(),
                    reason: format!(
                        "TLS is configured, so every endpoint must be https://: {}",
                        endpoints.join(",")
                    ),
                });
            }
            (None, n) if n > 0 => {
                return Err(StoreError::Invalid {
                    key: "etcdCACertFile".into(),
                    reason: format!(
                        "https endpoints ({}) need the CA that signed etcd's certificates \
                         (etcdCACertFile / ETCD_CA_CERT_FILE)",
                        endpoints.join(",")
                    ),
                });
            }
            _ => {}
        }
        let mut connect = ConnectOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((user, password)) = &options.credentials {
            connect = connect.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &options.tls {
            connect = connect.with_tls(tls.load()?);
        }
        let client = Client::connect(endpoints, Some(connect))
            .await
            .map_err(|e| map_err(&endpoints.join(","), e))?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one request, again (up to three times per endpoint) when it failed before
    /// reaching etcd: a connection that could not be made sent nothing, so even a write is
    /// safe to repeat, and the client's balancer then tries a member again. It picks at
    /// random, so with one member of three down, once per endpoint still failed about one
    /// read in a hundred (the cluster test caught it). A member that is down thus costs
    /// retries, not an error; a request that did reach etcd is never repeated here (its
    /// outcome is unknown to us, so the caller decides).
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.failover(|| self.client(), op).await
    }

    /// [`EtcdStore::call`] for key-value requests: hands out only the KV client (cloning the
    /// whole client per request clones every service's channel — measurable at thousands
    /// of requests a second).
    async fn call_kv<T, F, Fut>(&self, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.failover(|| self.client.kv_client(), op).await
    }

    /// Sends one transaction (with failover); errors name `key`.
    async fn send_txn(&self, key: &str, request: EtcdTxn) -> StoreResult<etcd_client::TxnResponse> {
        self.call_kv(|mut c| {
            let request = request.clone();
            async move { c.txn(request).await }
        })
        .await
        .map_err(|e| map_err(key, e))
    }

    async fn failover<C, T, F, Fut>(
        &self,
        client: impl Fn() -> C,
        op: F,
    ) -> Result<T, etcd_client::Error>
    where
        F: Fn(C) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut failed = 0;
        loop {
            match op(client()).await {
                Err(e) if failed < 3 * self.endpoints.len() && never_sent(&e) => {
                    failed += 1;
                    debug!(error = %describe_chain(&e), "etcd member unreachable; trying another");
                }
                other => return other,
            }
        }
    }

    /// Reads `key` and turns a failed conditional write into NotFound or Conflict.
    async fn explain_failed_compare(&self, key: &str) -> StoreError {
        match self.get(key).await {
            Ok(None) => StoreError::NotFound { key: key.into() },
            Ok(Some(_)) => StoreError::Conflict { key: key.into() },
            Err(e) => e,
        }
    }
}

/// Maps a client error to a typed store error naming `key`.
fn map_err(key: &str, err: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(status) => {
            let msg = status.message().to_string();
            if msg.contains("required revision has been compacted") {
                return StoreError::Compacted {
                    key: key.into(),
                    requested: 0,
                    compacted: 0,
                };
            }
            match status.code() {
                tonic_code::InvalidArgument | tonic_code::FailedPrecondition => {
                    StoreError::Invalid {
                        key: key.into(),
                        reason: msg,
                    }
                }
                tonic_code::NotFound => StoreError::NotFound { key: key.into() },
                _ => StoreError::Unavailable {
                    key: key.into(),
                    reason: describe_chain(&status),
                },
            }
        }
        E::InvalidArgs(msg) => StoreError::Invalid {
            key: key.into(),
            reason: msg,
        },
        E::InvalidUri(e) => StoreError::Invalid {
            key: key.into(),
            reason: format!("invalid etcd endpoint: {e}"),
        },
        other => StoreError::Unavailable {
            key: key.into(),
            reason: describe_chain(&other),
        },
    }
}

/// Whether the request failed while connecting (nothing was sent).
fn never_sent(err: &etcd_client::Error) -> bool {
    let text = describe_chain(err);
    text.contains("tcp connect error") || text.contains("Connection refused")
}

/// An error and its causes ("transport error: …: invalid peer certificate: UnknownIssuer"),
/// with what a TLS failure means in the operator's terms first.
fn describe_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    match tls_hint(&text) {
        Some(hint) => format!("{hint} ({text})"),
        None => text,
    }
}

fn tls_hint(text: &str) -> Option<&'static str> {
    if text.contains("UnknownIssuer") {
        Some("etcd's certificate is not signed by the CA in etcdCACertFile")
    } else if text.contains("Expired") {
        Some("etcd's certificate has expired")
    } else if text.contains("NotValidForName") {
        Some("etcd's certificate does not name the endpoint's host")
    } else if text.contains("BadCertificate") || text.contains("CertificateRequired") {
        Some(
            "etcd refused this client's certificate (none given, or not signed by a CA etcd trusts; etcdCertFile/etcdKeyFile)",
        )
    } else {
        None
    }
}

use tonic::Code as tonic_code;

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    }
}

/// The first key of each get response of a transaction, in order.
fn get_responses(resp: &etcd_client::TxnResponse) -> Vec<Option<KeyValue>> {
    resp.op_responses()
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(to_kv),
            _ => None,
        })
        .collect()
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision())
}

#[async_trait]
impl Datastore for EtcdStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let resp = self
            .call_kv(|mut c| async move { c.get(key, None).await })
            .await
            .map_err(|e| map_err(key, e))?;
        Ok(resp.kvs().first().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
        let end = prefix_range_end(prefix.as_bytes());
        let mut start = prefix.as_bytes().to_vec();
        let mut kvs = Vec::new();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            // Later pages are read at the first page's revision, so the listing is one
            // consistent snapshot even while others write.
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self
                .call_kv(|mut c| {
                    let (start, opts) = (start.clone(), opts.clone());
                    async move { c.get(start, Some(opts)).await }
                })
                .await
                .map_err(|e| map_err(prefix, e))?;
            if revision == 0 {
                revision = header_revision(resp.header());
            }
            kvs.extend(resp.kvs().iter().map(to_kv));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok(Listing { kvs, revision })
    }

    async fn create(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
        let txn = EtcdTxn::new()
            .when(vec![EtcdCompare::mod_revision(key, CompareOp::Equal, 0)])
            .and_then(vec![EtcdTxnOp::put(key, value, None)]);
        let resp = self.send_txn(key, txn).await?;
        if resp.succeeded() {
            Ok(header_revision(resp.header()))
        } else {
            Err(StoreError::AlreadyExists { key: key.into() })
        }
    }

    async fn update(&self, key: &str, value: &[u8], expected: Revision) -> StoreResult<Revision> {
        if expected <= 0 {
            return Err(StoreError::Invalid {
                key: key.into(),
                reason: format!("update needs the key's revision, got {expected}"),
            });
        }
        let txn = EtcdTxn::new()
            .when(vec![EtcdCompare::mod_revision(
                key,
                CompareOp::Equal,
                expected,
            )])
            // Keep an existing lease (etcd would otherwise detach the key from it).
            .and_then(vec![EtcdTxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        let resp = self.send_txn(key, txn).await?;
        if resp.succeeded() {
            Ok(header_revision(resp.header()))
        } else {
            Err(self.explain_failed_compare(key).await)
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
        let resp = self
            .call_kv(|mut c| async move { c.put(key, value, None).await })
            .await
            .map_err(|e| map_err(key, e))?;
        Ok(header_revision(resp.header()))
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> StoreResult<Revision> {
        let resp = self
            .call_kv(|mut c| async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            })
            .await
            .map_err(|e| lease_err(key, lease, e))?;
        Ok(header_revision(resp.header()))
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> StoreResult<Revision> {
        let compare = match expected {
            Some(rev) => EtcdCompare::mod_revision(key, CompareOp::Equal, rev),
            None => EtcdCompare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = EtcdTxn::new()
            .when(vec![compare])
            .and_then(vec![EtcdTxnOp::delete(key, None)]);
        let resp = self.send_txn(key, txn).await?;
        if resp.succeeded() {
            Ok(header_revision(resp.header()))
        } else if expected.is_none() {
            Err(StoreError::NotFound { key: key.into() })
        } else {
            Err(self.explain_failed_compare(key).await)
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> StoreResult<u64> {
        let opts = DeleteOptions::new().with_range(prefix_range_end(prefix.as_bytes()));
        let resp = self
            .call_kv(|mut c| {
                let opts = opts.clone();
                async move { c.delete(prefix, Some(opts)).await }
            })
            .await
            .map_err(|e| map_err(prefix, e))?;
        Ok(resp.deleted().max(0) as u64)
    }

    /// Without the failure branch's reads (a smaller request on the common, committed
    /// path); a conflict costs one more read to name the key.
    async fn txn(&self, txn: Txn) -> StoreResult<Revision> {
        txn.validate()?;
        let (first_key, request) = etcd_txn(&txn, false);
        let resp = self.send_txn(&first_key, request).await?;
        if resp.succeeded() {
            return Ok(header_revision(resp.header()));
        }
        let keys: Vec<String> = txn.compares.iter().map(|c| c.key().to_string()).collect();
        let current = self.get_many(&keys).await?;
        Err(StoreError::Conflict {
            key: super::failed_compare(&txn.compares, &current),
        })
    }

    async fn txn_or_read(&self, txn: Txn) -> StoreResult<TxnOutcome> {
        txn.validate()?;
        let (first_key, request) = etcd_txn(&txn, true);
        let resp = self.send_txn(&first_key, request).await?;
        if resp.succeeded() {
            return Ok(TxnOutcome::Committed(header_revision(resp.header())));
        }
        Ok(TxnOutcome::Failed {
            current: get_responses(&resp),
        })
    }

    async fn get_many(&self, keys: &[String]) -> StoreResult<Vec<Option<KeyValue>>> {
        let Some(first) = keys.first() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(keys.len());
        // A compare-less transaction of gets reads every key at one revision in one trip.
        for chunk in keys.chunks(super::MAX_TXN_OPS) {
            let reads: Vec<EtcdTxnOp> = chunk
                .iter()
                .map(|k| EtcdTxnOp::get(k.as_str(), None))
                .collect();
            let request = EtcdTxn::new().and_then(reads);
            let resp = self.send_txn(first, request).await?;
            out.extend(get_responses(&resp));
        }
        Ok(out)
    }

    async fn watch(&self, prefix: &str, start: Revision) -> StoreResult<Watch> {
        let start = if start > 0 {
            start
        } else {
            self.revision().await? + 1
        };
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::spawn(run_watch(self.client(), prefix.to_string(), start, tx));
        let stream = futures::stream::unfold((rx, AbortOnDrop(task)), |(mut rx, guard)| async {
            rx.recv().await.map(|event| (event, (rx, guard)))
        });
        Ok(Watch::new(Box::pin(stream)))
    }

    async fn grant_lease(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let secs = ttl.as_secs() as i64;
        if secs < 1 {
            return Err(StoreError::Invalid {
                key: "lease".into(),
                reason: "TTL must be at least one second".into(),
            });
        }
        let resp = self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await
            .map_err(|e| map_err("lease", e))?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let key = format!("lease {lease:x}");
        let (mut keeper, mut stream) = self
            .client()
            .lease_keep_alive(lease)
            .await
            .map_err(|e| lease_err(&key, lease, e))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| lease_err(&key, lease, e))?;
        match stream
            .message()
            .await
            .map_err(|e| lease_err(&key, lease, e))?
        {
            // etcd answers a keep-alive of an unknown or expired lease with TTL 0.
            Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl() as u64)),
            _ => Err(StoreError::NotFound { key }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> StoreResult<()> {
        self.client()
            .lease_revoke(lease)
            .await
            .map_err(|e| lease_err("lease", lease, e))?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.client()
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .map_err(|e| map_err("compact", e))?;
        Ok(())
    }

    async fn revision(&self) -> StoreResult<Revision> {
        // A one-key count-only range is the cheapest request that returns the header.
        let resp = self
            .call(
                |mut c| async move { c.get("\0", Some(GetOptions::new().with_count_only())).await },
            )
            .await
            .map_err(|e| map_err("revision", e))?;
        Ok(header_revision(resp.header()))
    }
}

/// The etcd transaction for `txn` (and the key errors name); with `reads`, the failure
/// branch reads back every compared key.
fn etcd_txn(txn: &Txn, reads: bool) -> (String, EtcdTxn) {
    let first_key = txn
        .ops
        .first()
        .map(|op| op.key().to_string())
        .or_else(|| txn.compares.first().map(|c| c.key().to_string()))
        .unwrap_or_default();
    let compares: Vec<EtcdCompare> = txn
        .compares
        .iter()
        .map(|c| match c {
            Compare::ModRevision { key, revision } => {
                EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
            }
        })
        .collect();
    let ops: Vec<EtcdTxnOp> = txn
        .ops
        .iter()
        .map(|op| match op {
            TxnOp::Put { key, value, lease } => EtcdTxnOp::put(
                key.as_str(),
                value.clone(),
                lease.map(|l| PutOptions::new().with_lease(l)),
            ),
            TxnOp::Delete { key } => EtcdTxnOp::delete(key.as_str(), None),
        })
        .collect();
    let mut request = EtcdTxn::new().when(compares).and_then(ops);
    if reads {
        let reads: Vec<EtcdTxnOp> = txn
            .compares
            .iter()
            .map(|c| EtcdTxnOp::get(c.key(), None))
            .collect();
        request = request.or_else(reads);
    }
    (first_key, request)
}

/// "lease not found" comes back as a NotFound gRPC status; name the lease in the error.
fn lease_err(key: &str, lease: LeaseId, err: etcd_client::Error) -> StoreError {
    let not_found = match &err {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        _ => false,
    };
    if not_found {
        return StoreError::NotFound {
            key: format!("lease {lease:x}"),
        };
    }
    map_err(key, err)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Feeds one watch: (re)opens the etcd watch from the next unseen revision until the
/// receiver goes away, so an etcd restart or a lost connection costs no events.
async fn run_watch(
    client: Client,
    prefix: String,
    mut next: Revision,
    tx: mpsc::Sender<StoreResult<WatchEvent>>,
) {
    let mut backoff = WATCH_RETRY_MIN;
    loop {
        let opts = WatchOptions::new()
            .with_range(prefix_range_end(prefix.as_bytes()))
            .with_start_revision(next)
            .with_progress_notify();
        let mut stream = match client.clone().watch(prefix.as_str(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                debug!(%prefix, error = %e, "watch: etcd unreachable, retrying");
                if wait_or_closed(&tx, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                msg = stream.message() => msg,
                _ = tx.closed() => return,
            };
            match msg {
                Ok(Some(resp)) => {
                    backoff = WATCH_RETRY_MIN;
                    if resp.compact_revision() > 0 {
                        let _ = tx
                            .send(Err(StoreError::Compacted {
                                key: prefix.clone(),
                                requested: next,
                                compacted: resp.compact_revision(),
                            }))
                            .await;
                        return;
                    }
                    if resp.canceled() {
                        warn!(%prefix, reason = resp.cancel_reason(), "watch cancelled by etcd; re-opening");
                        break;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let event = WatchEvent {
                            kind: match ev.event_type() {
                                EventType::Put => EventKind::Put,
                                EventType::Delete => EventKind::Delete,
                            },
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            value: kv.value().to_vec(),
                            revision: kv.mod_revision(),
                        };
                        next = next.max(event.revision + 1);
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(%prefix, error = %e, next, "watch stream broke; resuming");
                    break;
                }
            }
        }
        if wait_or_closed(&tx, &mut backoff).await {
            return;
        }
    }
}

/// Sleeps for the current backoff (doubling it); true if the receiver went away meanwhile.
async fn wait_or_closed(
    tx: &mpsc::Sender<StoreResult<WatchEvent>>,
    backoff: &mut Duration,
) -> bool {
    let delay = *backoff;
    *backoff = (*backoff * 2).min(WATCH_RETRY_MAX);
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = tx.closed() => true,
    }
}

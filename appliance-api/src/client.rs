//! The one typed blocking client of the control API (ureq): a method per endpoint returning
//! the model's types, bearer-token auth, errors carrying the API's code and message, and
//! [`poll_until`], the one loop that waits for jobs and states.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiRefusal, Error, TransportKind, excerpt};
use crate::model::{
    ApplianceInfo, ChangePointRequest, EnableRequest, Enabled, ExportRequest, ExportView,
    FailoverRequest, Health, ItemState, ItemView, JobView, MaterializeRequest, PointView,
    PromoteRequest, ReprotectRequest, SlotsView,
};

/// Largest answer read.
const MAX_ANSWER_BYTES: u64 = 64 << 20;
/// How long a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole call may take, by default.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
    /// DELETE.
    Delete,
}

impl Method {
    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Delete => "DELETE",
        }
    }
}

/// A blocking client of the control API at one base URL.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the API at `base` (`http://host:port`, a trailing `/` allowed; a bare
    /// `host:port` means http), authenticating with `token` when given.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, Error> {
        Self::with_timeout(base, token, CALL_TIMEOUT)
    }

    /// As [`Client::new`], with calls limited to `timeout` each.
    pub fn with_timeout(
        base: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let base = normalize_base(base)?;
        Ok(Self::at(base, token, timeout))
    }

    /// A client of nothing (`http://127.0.0.1:0`: every call is refused), to stand in until
    /// a server's address is known.
    pub fn placeholder() -> Self {
        Self::at("http://127.0.0.1:0".into(), None, CALL_TIMEOUT)
    }

    fn at(base: String, token: Option<String>, timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The API is local: never route it through a proxy from the environment.
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(timeout))
            .user_agent(concat!("appliance-api/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent: config.into(),
            base,
            token: token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()),
        }
    }

    /// The base URL, normalized (`http://host:port`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request; returns the status and body whatever the status. Only a transport
    /// failure (no connection, timeout, unreadable answer) is an error.
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String), Error> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|token| format!("Bearer {token}"));
        let result = match method {
            Method::Get | Method::Delete => {
                let mut request = if method == Method::Get {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                }
                .header("Accept", "application/json");
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call()
            }
            Method::Post => {
                let mut request = self.agent.post(&url).header("Accept", "application/json");
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                match body {
                    Some(body) => request.content_type("application/json").send(body),
                    None => request.send_empty(),
                }
            }
        };
        let transport = |error: ureq::Error| transport_error(method, &self.base, &url, error);
        let mut response = result.map_err(transport)?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(transport)?;
        Ok((status, text))
    }

    /// One call: the body serialized, a 2xx answer read as `T`, anything else an
    /// [`Error::Api`] carrying the API's error.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let body = body
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::Decode {
                method: method.name(),
                path: path.to_owned(),
                status: 0,
                expected: "a request body that serializes".into(),
                reason: e.to_string(),
                excerpt: String::new(),
            })?;
        let (status, text) = self.send(method, path, body)?;
        if !(200..300).contains(&status) {
            return Err(Error::Api(Box::new(ApiRefusal::parse(status, &text))));
        }
        serde_json::from_str(&text).map_err(|e| Error::Decode {
            method: method.name(),
            path: path.to_owned(),
            status,
            expected: short_type_name(std::any::type_name::<T>()),
            reason: e.to_string(),
            excerpt: excerpt(&text),
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::Get, path, None::<&()>)
    }

    fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        self.call(Method::Post, path, body)
    }

    /// `GET /health` (no token needed).
    pub fn health(&self) -> Result<Health, Error> {
        self.get("/health")
    }

    /// `GET /v1/appliance`.
    pub fn appliance(&self) -> Result<ApplianceInfo, Error> {
        self.get("/v1/appliance")
    }

    /// `GET /v1/slots`.
    pub fn slots(&self) -> Result<SlotsView, Error> {
        self.get("/v1/slots")
    }

    /// `GET /v1/items`.
    pub fn items(&self) -> Result<Vec<ItemView>, Error> {
        self.get("/v1/items")
    }

    /// `POST /v1/items`: enable protection.
    pub fn enable(&self, request: &EnableRequest) -> Result<Enabled, Error> {
        self.post("/v1/items", Some(request))
    }

    /// `GET /v1/items/{id}`.
    pub fn item(&self, id: &str) -> Result<ItemView, Error> {
        self.get(&format!("/v1/items/{id}"))
    }

    /// `DELETE /v1/items/{id}`: disable protection.
    pub fn disable(&self, id: &str) -> Result<ItemView, Error> {
        self.call(Method::Delete, &format!("/v1/items/{id}"), None::<&()>)
    }

    /// `GET /v1/items/{id}/points`, oldest first.
    pub fn points(&self, id: &str) -> Result<Vec<PointView>, Error> {
        self.get(&format!("/v1/items/{id}/points"))
    }

    /// `POST /v1/items/{id}/test-failover`.
    pub fn test_failover(&self, id: &str, request: &MaterializeRequest) -> Result<JobView, Error> {
        self.post(&format!("/v1/items/{id}/test-failover"), Some(request))
    }

    /// `POST /v1/items/{id}/test-failover/cleanup`.
    pub fn test_failover_cleanup(&self, id: &str) -> Result<ItemView, Error> {
        self.post(
            &format!("/v1/items/{id}/test-failover/cleanup"),
            None::<&()>,
        )
    }

    /// `POST /v1/items/{id}/failover`.
    pub fn failover(&self, id: &str, request: &FailoverRequest) -> Result<JobView, Error> {
        self.post(&format!("/v1/items/{id}/failover"), Some(request))
    }

    /// `POST /v1/items/{id}/change-point`.
    pub fn change_point(&self, id: &str, request: &ChangePointRequest) -> Result<JobView, Error> {
        self.post(&format!("/v1/items/{id}/change-point"), Some(request))
    }

    /// `POST /v1/items/{id}/commit`.
    pub fn commit(&self, id: &str) -> Result<ItemView, Error> {
        self.post(&format!("/v1/items/{id}/commit"), None::<&()>)
    }

    /// `POST /v1/items/{id}/reprotect`.
    pub fn reprotect(&self, id: &str, request: &ReprotectRequest) -> Result<Enabled, Error> {
        self.post(&format!("/v1/items/{id}/reprotect"), Some(request))
    }

    /// `POST /v1/items/{id}/failback`.
    pub fn failback(&self, id: &str) -> Result<JobView, Error> {
        self.post(&format!("/v1/items/{id}/failback"), None::<&()>)
    }

    /// `POST /v1/items/{id}/resync`.
    pub fn resync(&self, id: &str) -> Result<JobView, Error> {
        self.post(&format!("/v1/items/{id}/resync"), None::<&()>)
    }

    /// `POST /v1/items/{id}/test-failover/promote`: the test failover's drill becomes the
    /// failover, keeping its writes.
    pub fn promote(&self, id: &str, request: &PromoteRequest) -> Result<JobView, Error> {
        self.post(
            &format!("/v1/items/{id}/test-failover/promote"),
            Some(request),
        )
    }

    /// `POST /v1/items/{id}/exports`: a recovery point served over NBD.
    pub fn export(&self, id: &str, request: &ExportRequest) -> Result<ExportView, Error> {
        self.post(&format!("/v1/items/{id}/exports"), Some(request))
    }

    /// `GET /v1/exports`.
    pub fn exports(&self) -> Result<Vec<ExportView>, Error> {
        self.get("/v1/exports")
    }

    /// `GET /v1/exports/{export_id}`.
    pub fn export_view(&self, export_id: &str) -> Result<ExportView, Error> {
        self.get(&format!("/v1/exports/{export_id}"))
    }

    /// `DELETE /v1/exports/{export_id}`: its clients are disconnected, its overlay dropped,
    /// its point unpinned.
    pub fn remove_export(&self, export_id: &str) -> Result<ExportView, Error> {
        self.call(
            Method::Delete,
            &format!("/v1/exports/{export_id}"),
            None::<&()>,
        )
    }

    /// `GET /v1/jobs`.
    pub fn jobs(&self) -> Result<Vec<JobView>, Error> {
        self.get("/v1/jobs")
    }

    /// `GET /v1/jobs/{id}`.
    pub fn job(&self, id: u64) -> Result<JobView, Error> {
        self.get(&format!("/v1/jobs/{id}"))
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String, Error> {
        let (status, text) = self.send(Method::Get, "/metrics", None)?;
        if !(200..300).contains(&status) {
            return Err(Error::Api(Box::new(ApiRefusal::parse(status, &text))));
        }
        Ok(text)
    }

    /// `GET /openapi.json`: the document, as JSON.
    pub fn openapi(&self) -> Result<serde_json::Value, Error> {
        self.get("/openapi.json")
    }

    /// Waits until job `id` has ended, polling every `interval`; calls `progress` with each
    /// answer. A job that ended in `failed` is returned as it is: the caller decides.
    pub fn wait_job(
        &self,
        id: u64,
        interval: Duration,
        timeout: Duration,
        progress: &mut dyn FnMut(&JobView),
    ) -> Result<JobView, Error> {
        let mut last = None;
        poll_until(interval, timeout, || {
            let job = self.job(id)?;
            progress(&job);
            let finished = job.is_finished();
            last = Some(job.clone());
            Ok(finished.then_some(job))
        })
        .map_err(|e| timed_out(e, || format!("job {id} still running: {last:?}")))
    }

    /// Waits until item `id` is in `state`.
    pub fn wait_state(
        &self,
        id: &str,
        state: ItemState,
        interval: Duration,
        timeout: Duration,
    ) -> Result<ItemView, Error> {
        let mut seen = None;
        poll_until(interval, timeout, || {
            let item = self.item(id)?;
            seen = Some(item.state);
            Ok((item.state == state).then_some(item))
        })
        .map_err(|e| timed_out(e, || format!("item {id} not {state} (it is {seen:?})")))
    }

    /// Waits until point `point` of item `id` is listed (applied).
    pub fn wait_point(
        &self,
        id: &str,
        point: u64,
        interval: Duration,
        timeout: Duration,
    ) -> Result<PointView, Error> {
        poll_until(interval, timeout, || {
            Ok(self.points(id)?.into_iter().find(|p| p.id == point))
        })
        .map_err(|e| timed_out(e, || format!("point {point} of item {id} not applied")))
    }
}

/// A type's name without module paths: `Vec<ItemView>`.
fn short_type_name(full: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(word.rsplit("::").next().unwrap_or(word));
        word.clear();
    };
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Names what was awaited in a [`Error::TimedOut`]; other errors pass through.
fn timed_out(error: Error, what: impl FnOnce() -> String) -> Error {
    match error {
        Error::TimedOut { waited, .. } => Error::TimedOut {
            what: what(),
            waited,
        },
        other => other,
    }
}

/// The one poll loop: calls `probe` every `interval` until it gives a value, fails, or
/// `timeout` has passed ([`Error::TimedOut`]). The probe runs at least once.
pub fn poll_until<T>(
    interval: Duration,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>, Error>,
) -> Result<T, Error> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(Error::TimedOut {
                what: "the condition did not hold".into(),
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(interval);
    }
}

fn transport_error(method: Method, base: &str, url: &str, error: ureq::Error) -> Error {
    let kind = match &error {
        ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            TransportKind::Refused
        }
        ureq::Error::Timeout(_) => TransportKind::Timeout,
        ureq::Error::HostNotFound => TransportKind::HostNotFound,
        ureq::Error::ConnectionFailed | ureq::Error::Io(_) => TransportKind::Connection,
        _ => TransportKind::Other,
    };
    Error::Transport {
        method: method.name(),
        base: base.to_owned(),
        url: url.to_owned(),
        kind,
        detail: error.to_string(),
    }
}

/// `http://host:port` without a trailing `/`; a bare `host:port` gets `http://`.
pub fn normalize_base(base: &str) -> Result<String, Error> {
    let base = base.trim().trim_end_matches('/');
    if base.is_empty() {
        return Err(Error::BadUrl("--api: empty URL".into()));
    }
    if base.starts_with("https://") {
        return Err(Error::BadUrl(format!(
            "--api {base}: the control API is plain HTTP (on loopback or a trusted network); \
             use http://"
        )));
    }
    if base.starts_with("http://") {
        Ok(base.to_string())
    } else if base.contains("://") {
        Err(Error::BadUrl(format!(
            "--api {base}: expected an http:// URL"
        )))
    } else {
        Ok(format!("http://{base}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_lose_their_paths() {
        assert_eq!(
            short_type_name("alloc::vec::Vec<appliance_api::model::ItemView>"),
            "Vec<ItemView>"
        );
        assert_eq!(short_type_name("u64"), "u64");
    }

    #[test]
    fn poll_until_returns_the_value_or_times_out() {
        let mut calls = 0;
        let got = poll_until(Duration::ZERO, Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        });
        assert_eq!(got.ok(), Some(3));
        let timed_out = poll_until::<()>(Duration::from_millis(1), Duration::ZERO, || Ok(None));
        assert!(
            matches!(timed_out, Err(Error::TimedOut { .. })),
            "{timed_out:?}"
        );
    }

    #[test]
    fn a_refused_connection_is_a_transport_error_naming_the_base() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let client = Client::new(&format!("127.0.0.1:{port}/"), None).expect("client");
        assert_eq!(client.base(), format!("http://127.0.0.1:{port}"));
        match client.health() {
            Err(Error::Transport { kind, base, .. }) => {
                assert_eq!(kind, TransportKind::Refused);
                assert_eq!(base, client.base());
            }
            other => panic!("{other:?}"),
        }
    }
}

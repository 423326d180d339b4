//! An Agones SDK server in memory: what Agones' own `sdk-server --local` is to its SDKs.
//!
//! It speaks the sidecar's gRPC contract (tonic's server side, generated from the same protos
//! as the `agones` crate's client, `server/proto/agones`) and keeps one GameServer: its
//! state, labels, Counters and Lists, with the sidecar's rules (an undefined counter or list
//! is NotFound, a count outside `0..=capacity` and a list over its capacity are OutOfRange, a
//! value added twice is AlreadyExists, a list capacity over 1000 is InvalidArgument). Every
//! call is recorded, and a test can take the server down and up again on the same port, make
//! it refuse the calls of a method, or change the GameServer's state as a matchmaker's allocation would.
//!
//! It runs on a thread of its own (a single-threaded tokio runtime); taking it down drops the
//! runtime, so every connection and stream ends at once, as when a sidecar dies.

// tonic's service methods answer `Result<_, tonic::Status>` (176 bytes); the helpers here
// follow its API rather than box what tonic would unbox again.
#![allow(clippy::result_large_err)]

use futures_lite::Stream;
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

#[allow(missing_docs, dead_code, clippy::all, clippy::pedantic)]
mod proto {
    pub mod sdk {
        tonic::include_proto!("agones.dev.sdk");
    }
    pub mod beta {
        tonic::include_proto!("agones.dev.sdk.beta");
    }
}

use proto::beta;
use proto::sdk;

/// Largest List capacity the sidecar accepts (`apiserver.ListMaxCapacity`).
const LIST_MAX_CAPACITY: i64 = 1000;

/// The GameServer the local SDK server keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GameServerRecord {
    /// `status.state`: `Scheduled`, `Ready`, `Allocated`, `Shutdown`, ...
    pub state: String,
    /// Labels, with the `agones.dev/sdk-` prefix the sidecar gives them.
    pub labels: BTreeMap<String, String>,
    /// Annotations, with the same prefix.
    pub annotations: BTreeMap<String, String>,
    /// Counters: name to (count, capacity). Only these exist.
    pub counters: BTreeMap<String, (i64, i64)>,
    /// Lists: name to (capacity, values). Only these exist.
    pub lists: BTreeMap<String, (i64, Vec<String>)>,
}

impl GameServerRecord {
    /// A `Scheduled` GameServer with the Counters and the List of
    /// `deploy/agones/fleet.yaml`: `players` (capacity 1000), `rooms` (capacity 20) and the
    /// List `rooms` (capacity 20).
    pub fn tickshard() -> GameServerRecord {
        GameServerRecord {
            state: "Scheduled".into(),
            counters: [("players".into(), (0, 1000)), ("rooms".into(), (0, 20))].into(),
            lists: [("rooms".into(), (20, Vec::new()))].into(),
            ..GameServerRecord::default()
        }
    }
}

/// One call the server received.
#[derive(Clone, Debug)]
pub struct Call {
    /// When it arrived.
    pub at: Instant,
    /// The RPC: `Ready`, `Health` (one per ping), `SetLabel`, `UpdateCounter`, ...
    pub method: &'static str,
    /// What it asked, in short (`rooms count=2`, `tickshard-version=0.1.0`).
    pub detail: String,
}

/// What the server and its handle share.
struct Inner {
    record: GameServerRecord,
    calls: Vec<Call>,
    watchers: usize,
    /// Calls of these methods are answered with these statuses (a sidecar in trouble).
    refusing: BTreeMap<&'static str, tonic::Code>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every change of the record; watches send the GameServer on each bump.
    version: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a call and, unless the server is refusing, runs `f` on the record (bumping
    /// the version when it returns `true` for "changed").
    fn call<T>(
        &self,
        method: &'static str,
        detail: String,
        f: impl FnOnce(&mut GameServerRecord) -> Result<(T, bool), Status>,
    ) -> Result<Response<T>, Status> {
        let (result, changed) = {
            let mut inner = self.lock();
            inner.calls.push(Call {
                at: Instant::now(),
                method,
                detail,
            });
            if let Some(&code) = inner.refusing.get(method) {
                return Err(Status::new(code, format!("{method} refused")));
            }
            match f(&mut inner.record) {
                Ok((value, changed)) => (Ok(value), changed),
                Err(status) => (Err(status), false),
            }
        };
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
        result.map(Response::new)
    }

    fn game_server(&self) -> sdk::GameServer {
        let inner = self.lock();
        let record = &inner.record;
        sdk::GameServer {
            object_meta: Some(sdk::game_server::ObjectMeta {
                name: "local".into(),
                namespace: "default".into(),
                labels: record.labels.clone().into_iter().collect(),
                annotations: record.annotations.clone().into_iter().collect(),
                ..Default::default()
            }),
            spec: None,
            status: Some(sdk::game_server::Status {
                state: record.state.clone(),
                address: "127.0.0.1".into(),
                counters: record
                    .counters
                    .iter()
                    .map(|(name, &(count, capacity))| {
                        let status = sdk::game_server::status::CounterStatus { count, capacity };
                        (name.clone(), status)
                    })
                    .collect(),
                lists: record
                    .lists
                    .iter()
                    .map(|(name, (capacity, values))| {
                        let status = sdk::game_server::status::ListStatus {
                            capacity: *capacity,
                            values: values.clone(),
                        };
                        (name.clone(), status)
                    })
                    .collect(),
                ..Default::default()
            }),
        }
    }
}

/// The handle: the server runs until it is dropped.
pub struct LocalSdk {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Option<Running>,
}

/// The serving thread and how to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl LocalSdk {
    /// Serves `record` on a free port of 127.0.0.1.
    pub fn start(record: GameServerRecord) -> io::Result<LocalSdk> {
        LocalSdk::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), record)
    }

    /// Serves `record` on `addr`.
    pub fn start_on(addr: SocketAddr, record: GameServerRecord) -> io::Result<LocalSdk> {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                record,
                calls: Vec::new(),
                watchers: 0,
                refusing: BTreeMap::new(),
            }),
            version: watch::Sender::new(0),
        });
        let listener = StdListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let running = serve(listener, shared.clone())?;
        Ok(LocalSdk {
            addr,
            shared,
            running: Some(running),
        })
    }

    /// Where it listens (the value of `AGONES_SDK_GRPC_PORT` is its port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the server down (every connection and stream cut, new ones refused) or brings
    /// it up again on the same port, with the same GameServer.
    pub fn set_down(&mut self, down: bool) -> io::Result<()> {
        match (down, self.running.take()) {
            (true, Some(running)) => running.stop(),
            (false, None) => {
                let listener = StdListener::bind(self.addr)?;
                self.running = Some(serve(listener, self.shared.clone())?);
            }
            (_, running) => self.running = running,
        }
        Ok(())
    }

    /// Answers every call of `method` (`Ready`, `UpdateCounter`, ...) with `code` from now
    /// on (`None`: answers it normally again).
    pub fn set_refusing(&self, method: &'static str, code: Option<tonic::Code>) {
        let mut inner = self.shared.lock();
        match code {
            Some(code) => inner.refusing.insert(method, code),
            None => inner.refusing.remove(method),
        };
    }

    /// Sets the GameServer's state (as an allocation would, `Allocated`); watches are told.
    pub fn set_state(&self, state: &str) {
        self.shared.lock().record.state = state.into();
        self.shared.version.send_modify(|v| *v += 1);
    }

    /// A copy of the GameServer.
    pub fn record(&self) -> GameServerRecord {
        self.shared.lock().record.clone()
    }

    /// Every call received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// How many calls of `method` were received.
    pub fn count(&self, method: &str) -> usize {
        let inner = self.shared.lock();
        inner.calls.iter().filter(|c| c.method == method).count()
    }

    /// Watches open now.
    pub fn watchers(&self) -> usize {
        self.shared.lock().watchers
    }
}

impl Drop for LocalSdk {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

impl Running {
    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Starts serving on `listener` in a thread of its own.
fn serve(listener: StdListener, shared: Arc<Shared>) -> io::Result<Running> {
    listener.set_nonblocking(true)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("agones-local".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let server = tonic::transport::Server::builder()
                    .add_service(sdk::sdk_server::SdkServer::new(Service(shared.clone())))
                    .add_service(beta::sdk_server::SdkServer::new(Service(shared)))
                    .serve_with_incoming(incoming);
                tokio::select! {
                    _ = server => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection task: all streams end at once.
            drop(runtime);
        })?;
    Ok(Running { stop, thread })
}

/// Both services over the shared record.
#[derive(Clone)]
struct Service(Arc<Shared>);

fn not_found(what: &str, name: &str) -> Status {
    Status::not_found(format!("{what} not found: {name}"))
}

/// Whether `value` follows the Kubernetes label-value rules.
fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric())
}

/// Removes the watch from the count when its stream is dropped.
struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.lock().watchers -= 1;
    }
}

type GameServerStream = Pin<Box<dyn Stream<Item = Result<sdk::GameServer, Status>> + Send>>;

#[tonic::async_trait]
impl sdk::sdk_server::Sdk for Service {
    async fn ready(&self, _: Request<sdk::Empty>) -> Result<Response<sdk::Empty>, Status> {
        self.0.call("Ready", String::new(), |gs| {
            gs.state = "Ready".into();
            Ok((sdk::Empty {}, true))
        })
    }

    async fn allocate(&self, _: Request<sdk::Empty>) -> Result<Response<sdk::Empty>, Status> {
        self.0.call("Allocate", String::new(), |gs| {
            gs.state = "Allocated".into();
            Ok((sdk::Empty {}, true))
        })
    }

    async fn shutdown(&self, _: Request<sdk::Empty>) -> Result<Response<sdk::Empty>, Status> {
        self.0.call("Shutdown", String::new(), |gs| {
            gs.state = "Shutdown".into();
            Ok((sdk::Empty {}, true))
        })
    }

    async fn health(
        &self,
        request: Request<Streaming<sdk::Empty>>,
    ) -> Result<Response<sdk::Empty>, Status> {
        let mut pings = request.into_inner();
        while pings.message().await?.is_some() {
            self.0
                .call("Health", String::new(), |_| Ok(((), false)))
                .map(drop)?;
        }
        Ok(Response::new(sdk::Empty {}))
    }

    async fn get_game_server(
        &self,
        _: Request<sdk::Empty>,
    ) -> Result<Response<sdk::GameServer>, Status> {
        self.0
            .call("GetGameServer", String::new(), |_| Ok(((), false)))?;
        Ok(Response::new(self.0.game_server()))
    }

    type WatchGameServerStream = GameServerStream;

    async fn watch_game_server(
        &self,
        _: Request<sdk::Empty>,
    ) -> Result<Response<GameServerStream>, Status> {
        self.0
            .call("WatchGameServer", String::new(), |_| Ok(((), false)))?;
        self.0.lock().watchers += 1;
        let guard = WatchGuard(self.0.clone());
        let mut version = self.0.version.subscribe();
        version.mark_changed();
        // The current GameServer first, as newer sidecars send it, then one per change.
        let stream =
            futures_lite::stream::unfold((guard, version), |(guard, mut version)| async move {
                version.changed().await.ok()?;
                let game_server = guard.0.game_server();
                Some((Ok(game_server), (guard, version)))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn set_label(
        &self,
        request: Request<sdk::KeyValue>,
    ) -> Result<Response<sdk::Empty>, Status> {
        let kv = request.into_inner();
        let detail = format!("{}={}", kv.key, kv.value);
        self.0.call("SetLabel", detail, |gs| {
            if !is_label_value(&kv.value) {
                return Err(Status::invalid_argument(format!(
                    "invalid label value {:?}",
                    kv.value
                )));
            }
            gs.labels
                .insert(format!("agones.dev/sdk-{}", kv.key), kv.value);
            Ok((sdk::Empty {}, true))
        })
    }

    async fn set_annotation(
        &self,
        request: Request<sdk::KeyValue>,
    ) -> Result<Response<sdk::Empty>, Status> {
        let kv = request.into_inner();
        let detail = format!("{}={}", kv.key, kv.value);
        self.0.call("SetAnnotation", detail, |gs| {
            gs.annotations
                .insert(format!("agones.dev/sdk-{}", kv.key), kv.value);
            Ok((sdk::Empty {}, true))
        })
    }

    async fn reserve(
        &self,
        request: Request<sdk::Duration>,
    ) -> Result<Response<sdk::Empty>, Status> {
        let seconds = request.into_inner().seconds;
        self.0.call("Reserve", format!("{seconds}s"), |gs| {
            gs.state = "Reserved".into();
            Ok((sdk::Empty {}, true))
        })
    }
}

#[tonic::async_trait]
impl beta::sdk_server::Sdk for Service {
    async fn get_counter(
        &self,
        request: Request<beta::GetCounterRequest>,
    ) -> Result<Response<beta::Counter>, Status> {
        let name = request.into_inner().name;
        self.0.call("GetCounter", name.clone(), |gs| {
            let &(count, capacity) = gs
                .counters
                .get(&name)
                .ok_or_else(|| not_found("counter", &name))?;
            Ok((
                beta::Counter {
                    name,
                    count,
                    capacity,
                },
                false,
            ))
        })
    }

    async fn update_counter(
        &self,
        request: Request<beta::UpdateCounterRequest>,
    ) -> Result<Response<beta::Counter>, Status> {
        let update = request
            .into_inner()
            .counter_update_request
            .ok_or_else(|| Status::invalid_argument("counterUpdateRequest is required"))?;
        let detail = format!(
            "{} count={:?} capacity={:?} diff={}",
            update.name, update.count, update.capacity, update.count_diff
        );
        self.0.call("UpdateCounter", detail, |gs| {
            let counter = gs
                .counters
                .get_mut(&update.name)
                .ok_or_else(|| not_found("counter", &update.name))?;
            let mut capacity = counter.1;
            if let Some(new) = update.capacity {
                if new < 0 {
                    return Err(Status::out_of_range(format!("capacity {new} is below 0")));
                }
                capacity = new;
            }
            let mut count = counter.0.min(capacity);
            if let Some(new) = update.count {
                if !(0..=capacity).contains(&new) {
                    return Err(Status::out_of_range(format!(
                        "count {new} is out of range 0..={capacity}"
                    )));
                }
                count = new;
            }
            let shifted = count.saturating_add(update.count_diff);
            if update.count_diff != 0 && !(0..=capacity).contains(&shifted) {
                return Err(Status::out_of_range(format!(
                    "count {shifted} is out of range 0..={capacity}"
                )));
            }
            *counter = (shifted, capacity);
            Ok((
                beta::Counter {
                    name: update.name.clone(),
                    count: shifted,
                    capacity,
                },
                true,
            ))
        })
    }

    async fn get_list(
        &self,
        request: Request<beta::GetListRequest>,
    ) -> Result<Response<beta::List>, Status> {
        let name = request.into_inner().name;
        self.0.call("GetList", name.clone(), |gs| {
            let (capacity, values) = gs
                .lists
                .get(&name)
                .ok_or_else(|| not_found("list", &name))?;
            let list = beta::List {
                name: name.clone(),
                capacity: *capacity,
                values: values.clone(),
            };
            Ok((list, false))
        })
    }

    async fn update_list(
        &self,
        request: Request<beta::UpdateListRequest>,
    ) -> Result<Response<beta::List>, Status> {
        let request = request.into_inner();
        let list = request
            .list
            .ok_or_else(|| Status::invalid_argument("list is required"))?;
        let mask = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let detail = format!("{} mask={mask:?} capacity={}", list.name, list.capacity);
        self.0.call("UpdateList", detail, |gs| {
            let held = gs
                .lists
                .get_mut(&list.name)
                .ok_or_else(|| not_found("list", &list.name))?;
            if mask.is_empty() {
                return Err(Status::invalid_argument("update_mask is required"));
            }
            for path in &mask {
                match path.as_str() {
                    "capacity" => {
                        if !(0..=LIST_MAX_CAPACITY).contains(&list.capacity) {
                            return Err(Status::invalid_argument(format!(
                                "capacity {} is out of range 0..={LIST_MAX_CAPACITY}",
                                list.capacity
                            )));
                        }
                        held.0 = list.capacity;
                        let keep = usize::try_from(held.0).unwrap_or(0);
                        held.1.truncate(keep);
                    }
                    "values" => held.1 = list.values.clone(),
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "unknown field in update_mask: {other}"
                        )))
                    }
                }
            }
            let answer = beta::List {
                name: list.name.clone(),
                capacity: held.0,
                values: held.1.clone(),
            };
            Ok((answer, true))
        })
    }

    async fn add_list_value(
        &self,
        request: Request<beta::AddListValueRequest>,
    ) -> Result<Response<beta::List>, Status> {
        let request = request.into_inner();
        let detail = format!("{} {}", request.name, request.value);
        self.0.call("AddListValue", detail, |gs| {
            let (capacity, values) = gs
                .lists
                .get_mut(&request.name)
                .ok_or_else(|| not_found("list", &request.name))?;
            if values.contains(&request.value) {
                return Err(Status::already_exists(format!(
                    "{} already in list {}",
                    request.value, request.name
                )));
            }
            if values.len() as i64 >= *capacity {
                return Err(Status::out_of_range(format!(
                    "list {} is at its capacity {capacity}",
                    request.name
                )));
            }
            values.push(request.value.clone());
            let answer = beta::List {
                name: request.name.clone(),
                capacity: *capacity,
                values: values.clone(),
            };
            Ok((answer, true))
        })
    }

    async fn remove_list_value(
        &self,
        request: Request<beta::RemoveListValueRequest>,
    ) -> Result<Response<beta::List>, Status> {
        let request = request.into_inner();
        let detail = format!("{} {}", request.name, request.value);
        self.0.call("RemoveListValue", detail, |gs| {
            let (capacity, values) = gs
                .lists
                .get_mut(&request.name)
                .ok_or_else(|| not_found("list", &request.name))?;
            let Some(at) = values.iter().position(|v| *v == request.value) else {
                return Err(Status::not_found(format!(
                    "{} not in list {}",
                    request.value, request.name
                )));
            };
            values.remove(at);
            let answer = beta::List {
                name: request.name.clone(),
                capacity: *capacity,
                values: values.clone(),
            };
            Ok((answer, true))
        })
    }
}

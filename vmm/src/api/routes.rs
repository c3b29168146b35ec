//! The endpoints: `(method, path)` → operation → response.
//!
//! | Method | Path | Answer |
//! | --- | --- | --- |
//! | GET | `/api/v1/vm.ping` | 200 `{"version"}` |
//! | GET | `/api/v1/vm.info` | 200 [`super::VmInfo`] |
//! | GET | `/api/v1/vm.counters` | 200 [`super::VmCounters`] |
//! | GET | `/api/v1/metrics`, `/metrics` | 200 Prometheus text ([`super::metrics`]) |
//! | PUT | `/api/v1/vm.pause` | 204, 409 when paused or stopping |
//! | PUT | `/api/v1/vm.resume` | 204, 409 when not paused |
//! | PUT | `/api/v1/vm.shutdown` | 200 [`super::ShutdownOutcome`] (power button, then a forced stop after the timeout; optional body `{"timeout_ms": N}`), 400 for another body |
//!
//! Anything else is 404 (unknown path) or 405 with `Allow` (known path, other method); every
//! error body is `{"error": "..."}`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::http::{Request, Response, PROMETHEUS};
use super::metrics::prometheus;
use super::{ShutdownOutcome, VmCounters, VmInfo, MAX_SHUTDOWN_TIMEOUT, SHUTDOWN_TIMEOUT};
use crate::vstate::vcpu::VcpuControlError;

/// What the API can do to a VM (implemented by [`super::VmControl`]; tests use fakes).
pub trait VmApi: Send + Sync {
    /// State, uptime, vCPUs, configuration.
    fn info(&self) -> VmInfo;
    /// Device and vIOMMU counters.
    fn counters(&self) -> VmCounters;
    /// Parks every vCPU.
    fn pause(&self) -> Result<(), VcpuControlError>;
    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<(), VcpuControlError>;
    /// Presses the power button, waits at most `timeout` for the guest to power off, then
    /// stops the VM.
    fn shutdown(&self, timeout: Duration) -> ShutdownOutcome;
}

/// The operations, one per endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /api/v1/vm.ping`.
    Ping,
    /// `GET /api/v1/vm.info`.
    Info,
    /// `GET /api/v1/vm.counters`.
    Counters,
    /// `GET /api/v1/metrics` or `/metrics`.
    Metrics,
    /// `PUT /api/v1/vm.pause`.
    Pause,
    /// `PUT /api/v1/vm.resume`.
    Resume,
    /// `PUT /api/v1/vm.shutdown`.
    Shutdown,
}

/// Prefix of the versioned endpoints.
pub const API_PREFIX: &str = "/api/v1/";

impl Route {
    /// The route of `path` and the one method it takes.
    fn of_path(path: &str) -> Option<(Route, &'static str)> {
        if path == "/metrics" {
            return Some((Route::Metrics, "GET"));
        }
        Some(match path.strip_prefix(API_PREFIX)? {
            "vm.ping" => (Route::Ping, "GET"),
            "vm.info" => (Route::Info, "GET"),
            "vm.counters" => (Route::Counters, "GET"),
            "metrics" => (Route::Metrics, "GET"),
            "vm.pause" => (Route::Pause, "PUT"),
            "vm.resume" => (Route::Resume, "PUT"),
            "vm.shutdown" => (Route::Shutdown, "PUT"),
            _ => return None,
        })
    }

    /// The route of a request, or the error response (404, 405).
    pub fn of(req: &Request) -> Result<Route, Response> {
        let Some((route, method)) = Self::of_path(&req.path) else {
            return Err(Response::error(
                404,
                &format!("no endpoint {:?}; see {API_PREFIX}vm.ping", req.path),
            ));
        };
        if req.method != method {
            let mut r = Response::error(
                405,
                &format!("{} takes {method}, not {:?}", req.path, req.method),
            );
            r.allow = Some(method);
            return Err(r);
        }
        Ok(route)
    }
}

#[derive(Serialize)]
struct Ping {
    version: &'static str,
}

/// The optional body of `PUT /api/v1/vm.shutdown`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    /// How long to wait for the guest's power-off, in milliseconds (0: stop at once).
    timeout_ms: Option<u64>,
}

/// The wait a shutdown request asks for: [`SHUTDOWN_TIMEOUT`] without a body (or with an
/// empty JSON object), else its `timeout_ms`, at most [`MAX_SHUTDOWN_TIMEOUT`].
fn shutdown_timeout(body: &[u8]) -> Result<Duration, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(SHUTDOWN_TIMEOUT);
    }
    let b: ShutdownBody = serde_json::from_slice(body).map_err(|e| {
        format!("the body of vm.shutdown must be empty or {{\"timeout_ms\": N}}: {e}")
    })?;
    let t = b.timeout_ms.map_or(SHUTDOWN_TIMEOUT, Duration::from_millis);
    if t > MAX_SHUTDOWN_TIMEOUT {
        return Err(format!(
            "timeout_ms {} is more than the {} ms a shutdown may wait",
            t.as_millis(),
            MAX_SHUTDOWN_TIMEOUT.as_millis()
        ));
    }
    Ok(t)
}

fn control_result(r: Result<(), VcpuControlError>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => {
            let status = match e {
                VcpuControlError::AlreadyPaused
                | VcpuControlError::NotPaused
                | VcpuControlError::Stopping => 409,
                VcpuControlError::PauseTimeout(_) | VcpuControlError::ResumeTimeout(_) => 500,
            };
            Response::error(status, &e.to_string())
        }
    }
}

/// Answers one request.
pub fn handle(api: &dyn VmApi, req: &Request) -> Response {
    let route = match Route::of(req) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match route {
        Route::Ping => Response::json(
            200,
            &Ping {
                version: env!("CARGO_PKG_VERSION"),
            },
        ),
        Route::Info => Response::json(200, &api.info()),
        Route::Counters => Response::json(200, &api.counters()),
        Route::Metrics => Response::text(PROMETHEUS, prometheus(&api.info(), &api.counters())),
        Route::Pause => control_result(api.pause()),
        Route::Resume => control_result(api.resume()),
        Route::Shutdown => match shutdown_timeout(&req.body) {
            Ok(timeout) => Response::json(200, &api.shutdown(timeout)),
            Err(e) => Response::error(400, &e),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{ShutdownResult, VmState};
    use crate::VmConfig;
    use std::sync::Mutex;

    /// A VM that records what was asked of it.
    #[derive(Default)]
    pub(crate) struct FakeVm {
        pub paused: Mutex<bool>,
        pub shutdowns: Mutex<Vec<Duration>>,
    }

    impl VmApi for FakeVm {
        fn info(&self) -> VmInfo {
            let paused = *self.paused.lock().unwrap();
            VmInfo {
                version: "test",
                state: if paused {
                    VmState::Paused
                } else {
                    VmState::Running
                },
                uptime_ms: 1234,
                vcpus: Vec::new(),
                exit: None,
                config: VmConfig::new("/k"),
            }
        }
        fn counters(&self) -> VmCounters {
            VmCounters {
                uptime_ms: 1234,
                vhost_user: vec![serde_json::json!({"device": 0, "misses": 3, "socket": "/s"})],
                vhost_net: vec![],
                viommu: None,
            }
        }
        fn pause(&self) -> Result<(), VcpuControlError> {
            let mut p = self.paused.lock().unwrap();
            if *p {
                return Err(VcpuControlError::AlreadyPaused);
            }
            *p = true;
            Ok(())
        }
        fn resume(&self) -> Result<(), VcpuControlError> {
            let mut p = self.paused.lock().unwrap();
            if !*p {
                return Err(VcpuControlError::NotPaused);
            }
            *p = false;
            Ok(())
        }
        fn shutdown(&self, timeout: Duration) -> ShutdownOutcome {
            self.shutdowns.lock().unwrap().push(timeout);
            ShutdownOutcome {
                result: ShutdownResult::PoweredOff,
                exit: "power_off".into(),
                button: true,
                waited_ms: 42,
            }
        }
    }

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: Vec::new(),
            close: false,
        }
    }

    fn json(r: &Response) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn every_endpoint_answers_its_method() {
        let vm = FakeVm::default();
        let r = handle(&vm, &req("GET", "/api/v1/vm.ping"));
        assert_eq!(
            (r.status, json(&r)["version"].as_str()),
            (200, Some(env!("CARGO_PKG_VERSION")))
        );
        let r = handle(&vm, &req("GET", "/api/v1/vm.info"));
        assert_eq!(
            (r.status, json(&r)["state"].as_str()),
            (200, Some("running"))
        );
        assert_eq!(json(&r)["config"]["kernel"], "/k");
        let r = handle(&vm, &req("GET", "/api/v1/vm.counters"));
        assert_eq!(json(&r)["vhost_user"][0]["misses"], 3);
        for path in ["/metrics", "/api/v1/metrics"] {
            let r = handle(&vm, &req("GET", path));
            assert_eq!((r.status, r.content_type), (200, PROMETHEUS));
            let text = String::from_utf8(r.body).unwrap();
            assert!(text.contains("iovmm_vhost_user_misses_total{"), "{text}");
        }
    }

    #[test]
    fn pause_resume_and_shutdown_change_the_vm_and_conflicts_are_409() {
        let vm = FakeVm::default();
        assert_eq!(handle(&vm, &req("PUT", "/api/v1/vm.pause")).status, 204);
        assert!(*vm.paused.lock().unwrap());
        let again = handle(&vm, &req("PUT", "/api/v1/vm.pause"));
        assert_eq!(again.status, 409);
        assert_eq!(json(&again)["error"], "the VM is already paused");
        assert_eq!(handle(&vm, &req("PUT", "/api/v1/vm.resume")).status, 204);
        assert_eq!(handle(&vm, &req("PUT", "/api/v1/vm.resume")).status, 409);
        let r = handle(&vm, &req("PUT", "/api/v1/vm.shutdown"));
        assert_eq!(r.status, 200);
        assert_eq!(
            json(&r),
            serde_json::json!({"result": "powered-off", "exit": "power_off", "button": true, "waited_ms": 42})
        );
        assert_eq!(*vm.shutdowns.lock().unwrap(), vec![SHUTDOWN_TIMEOUT]);
    }

    fn put_shutdown(vm: &FakeVm, body: &str) -> Response {
        let mut r = req("PUT", "/api/v1/vm.shutdown");
        r.body = body.as_bytes().to_vec();
        handle(vm, &r)
    }

    #[test]
    fn shutdown_takes_an_optional_timeout_and_refuses_other_bodies() {
        let vm = FakeVm::default();
        for (body, want) in [
            ("", SHUTDOWN_TIMEOUT),
            (" \r\n", SHUTDOWN_TIMEOUT),
            ("{}", SHUTDOWN_TIMEOUT),
            ("{\"timeout_ms\": 250}", Duration::from_millis(250)),
            ("{\"timeout_ms\": 0}", Duration::ZERO),
            ("{\"timeout_ms\": 60000}", MAX_SHUTDOWN_TIMEOUT),
        ] {
            assert_eq!(put_shutdown(&vm, body).status, 200, "{body:?}");
            assert_eq!(vm.shutdowns.lock().unwrap().pop(), Some(want), "{body:?}");
        }
        for body in [
            "{\"timeout_ms\": 60001}",
            "{\"timeout_ms\": -1}",
            "{\"timeout\": 5}",
            "[]",
            "yes",
        ] {
            let r = put_shutdown(&vm, body);
            assert_eq!(r.status, 400, "{body:?}");
            assert!(
                json(&r)["error"].as_str().unwrap().contains("timeout_ms"),
                "{body:?}"
            );
        }
        assert!(
            vm.shutdowns.lock().unwrap().is_empty(),
            "a refused body stops nothing"
        );
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
        let vm = FakeVm::default();
        for path in [
            "/",
            "/api/v1/",
            "/api/v2/vm.info",
            "/api/v1/vm.infox",
            "/metrics/",
        ] {
            let r = handle(&vm, &req("GET", path));
            assert_eq!(r.status, 404, "{path}");
            assert!(json(&r)["error"].as_str().unwrap().contains("no endpoint"));
        }
        let r = handle(&vm, &req("GET", "/api/v1/vm.pause"));
        assert_eq!((r.status, r.allow), (405, Some("PUT")));
        assert!(!*vm.paused.lock().unwrap(), "a GET must not pause");
        let r = handle(&vm, &req("DELETE", "/api/v1/vm.info"));
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        assert_eq!(handle(&vm, &req("POST", "/api/v1/vm.shutdown")).status, 405);
        assert!(vm.shutdowns.lock().unwrap().is_empty());
    }

    #[test]
    fn timeouts_of_the_vcpus_are_server_errors() {
        let r = control_result(Err(VcpuControlError::PauseTimeout(vec![1])));
        assert_eq!(r.status, 500);
        assert!(json(&r)["error"].as_str().unwrap().contains("[1]"));
    }
}

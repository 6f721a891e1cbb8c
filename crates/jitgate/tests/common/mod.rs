//! Helpers shared by the test binaries of this crate (`mod common;`, and in `e2e/`
//! through `#[path]`): the built binary, free ports, a child process killed on drop, a
//! child's stderr captured, blocking HTTP calls, and waiting for a condition.

// Each test binary uses some of these.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `jitgate` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_jitgate");

/// A loopback port nothing listens on (now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed and reaped when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects the child's stderr (piped) line by line into a shared string, for failure
/// reports and for checking what was logged.
pub fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    log
}

/// Writes `text` to the child's standard input (piped) and closes it.
pub fn feed_stdin(child: &mut Child, text: &str) {
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// Waits until `addr` accepts a TCP connection; fails with the child's log when the
/// child exits first, or after `within`.
pub fn wait_listening(child: &mut Child, addr: &str, log: &Mutex<String>, within: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve exited with {status}: {}", log.lock().unwrap());
        }
        assert!(
            start.elapsed() < within,
            "not listening on {addr}: {}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a future to completion on a small runtime of its own, so tests stay plain
/// blocking code.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// One authenticated call: (status, body as JSON, or as a string when it is not JSON).
pub fn call(method: &str, url: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    block_on(async {
        let mut req = reqwest::Client::new()
            .request(method.parse().unwrap(), url)
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
}

/// One authenticated GET: (status, body).
pub fn http_get(url: &str, token: &str) -> (u16, Value) {
    call("GET", url, token, None)
}

/// Polls `f` every 100 ms until it gives a value; fails after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

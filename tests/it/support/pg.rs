//! A throwaway PostgreSQL cluster for tests: `initdb` into a temp dir, a server on a
//! free loopback port, a fresh database per caller, and everything stopped and removed
//! on drop.
//!
//! The server binaries are looked up on `PATH`, then in `/usr/lib/postgresql/*/bin`
//! (newest first), then `/usr/local/bin` (`TOLLGATE_PG_BIN` overrides). PostgreSQL
//! refuses to run as root, so as root every server command runs as the `postgres` user
//! (created with `useradd --system` if missing) and the temp dir is handed to it. Only
//! std, tokio, tokio-postgres and tempfile are used: `ledger_conformance.rs` includes
//! this file on its own with `#[path]`.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the server binaries are; the panic message says how to get them.
pub(crate) fn bin_dir() -> PathBuf {
    let has_server = |d: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| d.join(b).is_file());
    if let Some(dir) = std::env::var_os("TOLLGATE_PG_BIN") {
        return PathBuf::from(dir);
    }
    let on_path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    if let Some(dir) = on_path.into_iter().find(|d| has_server(d)) {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return dir;
    }
    let local = PathBuf::from("/usr/local/bin");
    if has_server(&local) {
        return local;
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH, in \
         /usr/lib/postgresql/*/bin or /usr/local/bin: install them (`apt-get install postgresql`; \
         scripts/test.sh does it) or set TOLLGATE_PG_BIN"
    );
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Creates the `postgres` system user if it does not exist (once per process).
fn ensure_postgres_user() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let exists = Command::new("id").args(["-u", "postgres"]).output().is_ok_and(|o| o.status.success());
    if !exists {
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/bin/sh", "postgres"])
            .output()
            .expect("run useradd");
        // 9: the user appeared meanwhile (another test binary).
        assert!(
            out.status.success() || out.status.code() == Some(9),
            "useradd postgres failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *done = true;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// PIDs whose parent is `parent` (the server's backends and helpers).
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(parent)
        })
        .collect()
}

/// Waits up to `within` for every pid to exit; SIGKILLs the survivors and waits again.
fn reap(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
    // Never a second panic while a failing test unwinds: that would abort the binary.
    if !left.is_empty() && !std::thread::panicking() {
        panic!("PostgreSQL processes survived SIGKILL: {left:?}");
    }
}

/// One PostgreSQL server in a temp dir. Dropping it stops the server (immediate
/// shutdown), checks by PID that no server process is left, and removes the dir.
pub(crate) struct Cluster {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    /// The postmaster's PID while it runs.
    pid: Mutex<Option<u32>>,
    next_db: AtomicUsize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("port", &self.port).field("pid", &self.pid()).finish()
    }
}

impl Cluster {
    /// `initdb` and start a server. Blocking (about a second); see [`Cluster::spawn`].
    pub(crate) fn init() -> Cluster {
        let bin = bin_dir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("tollgate-pg-").tempdir().expect("temp dir");
        if as_postgres {
            ensure_postgres_user();
            let out = Command::new("chown").arg("postgres").arg(dir.path()).output().expect("run chown");
            assert!(out.status.success(), "chown postgres {}: {}", dir.path().display(), lossy(&out.stderr));
        }
        let cluster = Cluster {
            dir: Some(dir),
            bin,
            port: free_port(),
            as_postgres,
            pid: Mutex::new(None),
            next_db: AtomicUsize::new(0),
        };
        let data = cluster.data().display().to_string();
        let flags = "-A trust -U postgres -E UTF8 --locale=C --no-sync --no-instructions";
        let args: Vec<&str> = ["-D", data.as_str()].into_iter().chain(flags.split_whitespace()).collect();
        cluster.run("initdb", &args);
        cluster.start();
        cluster
    }

    /// [`Cluster::init`] off the async runtime's worker threads.
    pub(crate) async fn spawn() -> Cluster {
        tokio::task::spawn_blocking(Cluster::init).await.expect("cluster start-up panicked")
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("cluster dir").path()
    }

    fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The URL of database `db` (trust authentication, user `postgres`).
    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `CREATE DATABASE t_<n>`; returns its URL.
    pub(crate) async fn create_db(&self) -> String {
        let name = format!("t_{}", self.next_db.fetch_add(1, Ordering::SeqCst));
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to the test cluster on port {}: {e}", self.port));
        let task = tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("CREATE DATABASE");
        drop(client);
        let _ = task.await;
        self.url(&name)
    }

    /// Starts the server (again) on the same port and data dir; waits until it accepts
    /// connections.
    pub(crate) fn start(&self) {
        let dir = self.dir().display().to_string();
        // `fsync=off` loses nothing when only the server stops (the OS keeps what was
        // written); `synchronous_commit` stays on, else an immediate stop (`stop`) loses
        // commits already acknowledged, which the outage tests count on keeping.
        let opts = format!(
            "-p {} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off -c max_connections=200",
            self.port
        );
        let log = self.dir().join("server.log").display().to_string();
        let data = self.data().display().to_string();
        let out = self.try_run("pg_ctl", &["-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start"]);
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default();
            panic!("pg_ctl start failed: {}{}\nserver log:\n{log}", lossy(&out.stdout), lossy(&out.stderr));
        }
        let pidfile = std::fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        let pid = pidfile.lines().next().and_then(|l| l.trim().parse().ok()).expect("postmaster pid");
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`), and makes sure by PID that
    /// the postmaster and every process it had started are gone.
    pub(crate) fn stop(&self) {
        let Some(pid) = self.pid.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let mut pids = children(pid);
        pids.push(pid);
        let data = self.data().display().to_string();
        let _ = self.try_run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "-t", "10", "stop"]);
        reap(&pids, Duration::from_secs(10));
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self.try_run(program, args);
        assert!(out.status.success(), "{program} {args:?} failed: {}{}", lossy(&out.stdout), lossy(&out.stderr));
        out
    }

    /// Runs a server binary, as the `postgres` user when we are root.
    fn try_run(&self, program: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(program);
        let mut cmd = if !self.as_postgres {
            let mut c = Command::new(&exe);
            c.args(args);
            c
        } else if Path::new("/usr/sbin/runuser").exists() || Path::new("/sbin/runuser").exists() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe).args(args);
            c
        } else {
            let line = std::iter::once(exe.display().to_string())
                .chain(args.iter().map(|a| a.to_string()))
                .map(|a| shell_quote(&a))
                .collect::<Vec<_>>()
                .join(" ");
            let mut c = Command::new("su");
            c.args(["postgres", "-s", "/bin/sh", "-c", &format!("exec {line}")]);
            c
        };
        // The server's own output goes to server.log; nothing keeps our pipes open.
        cmd.current_dir(self.dir()).stdin(Stdio::null());
        cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

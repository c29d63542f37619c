//! Child processes that are stopped when dropped (also on error), free loopback ports, and
//! waiting for a listener without connecting to it.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A child process: SIGTERM on drop, SIGKILL if it has not exited 5 s later.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `command` with stdin from /dev/null and stdout+stderr into `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Proc> {
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        println!("  $ {}", crate::cmd::display(command));
        let child = command
            .spawn()
            .with_context(|| format!("could not start {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its output:\n{}",
                self.name,
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Waits until `addr` is in LISTEN state (read from /proc/net/tcp: no probe connection,
    /// which would be one more session on the backends).
    pub fn wait_listening(&mut self, addr: SocketAddr, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_listening(addr)? {
            self.check_alive(log)?;
            if Instant::now() > deadline {
                bail!("{} does not listen on {addr} after 20 s", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM first: NGINX's master stops its workers, mxlb removes its pins.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn is_listening(addr: SocketAddr) -> Result<bool> {
    let SocketAddr::V4(v4) = addr else {
        bail!("only IPv4 loopback is used");
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = fs::read_to_string("/proc/net/tcp")?;
    Ok(table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        local == Some(want.as_str()) && state == Some("0A")
    }))
}

/// A private directory for configs and logs, removed on drop unless MXLB_BENCH_KEEP is set.
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    pub fn new() -> Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("mxlb-bench-{}", std::process::id()));
        fs::create_dir_all(&path)?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("MXLB_BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            println!("bench: kept {}", self.0.display());
        }
    }
}

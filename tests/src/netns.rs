//! A network namespace of a test's own (`ip netns`): its loopback is up and nothing else
//! runs there, so a test can bind addresses the host does not have, or drop packets with
//! nftables, without touching the host's network. Removed on drop.
//!
//! Sockets live in the namespace of the thread that creates them, so [`Netns::run`] runs
//! the test body on a thread that has joined the namespace (`setns`); threads it spawns
//! and processes it starts (the daemon, backends) inherit it.

use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

pub struct Netns {
    name: String,
}

impl Netns {
    /// `mxlb-test-<what>-<pid>`, with loopback up.
    pub fn create(what: &str) -> Result<Netns> {
        let name = format!("mxlb-test-{what}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name])?;
        let netns = Netns { name };
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Runs a command inside the namespace (`ip netns exec`); fails with its stderr.
    pub fn exec(&self, command: &[&str]) -> Result<()> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    /// Runs `body` on a thread that has joined the namespace.
    pub fn run<T: Send>(&self, body: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).with_context(|| path.clone())?;
                    // SAFETY: setns on a descriptor we own; it changes only this thread.
                    let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    ensure!(joined == 0, "setns: {}", std::io::Error::last_os_error());
                    body()
                })
                .join()
                .expect("the namespace's thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

//! The programs the benchmark drives: Postfix's smtp-source and smtp-sink, HAProxy, and
//! NGINX with its stream module (optional: skipped, with the reason in the report, when it
//! cannot be installed or has no stream module).

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{cmd, setup};

pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// What was found on the machine.
pub struct Tools {
    pub haproxy_version: String,
    /// `Ok((version, stream module to load, if dynamic))`, or why NGINX is skipped.
    pub nginx: Result<Nginx, String>,
}

pub struct Nginx {
    pub version: String,
    pub stream_module: Option<PathBuf>,
}

pub fn ensure() -> Result<Tools> {
    // postfix and haproxy are in `cargo xtask setup`'s list already; asking again is cheap.
    setup::install_missing("bench packages", &["postfix", "haproxy"])?;
    for tool in [SMTP_SOURCE, SMTP_SINK] {
        if !std::path::Path::new(tool).is_file() {
            bail!("{tool} is missing although postfix is installed");
        }
    }
    let haproxy_version = first_line(Command::new("haproxy").arg("-v"))?;
    let nginx = setup::install_missing("bench packages (NGINX)", &["nginx", "libnginx-mod-stream"])
        .map_err(|e| format!("could not install nginx: {e:#}"))
        .and_then(|()| nginx_stream());
    if let Err(why) = &nginx {
        println!("  NGINX skipped: {why}");
    }
    Ok(Tools {
        haproxy_version,
        nginx,
    })
}

fn first_line(command: &mut Command) -> Result<String> {
    let out = cmd::output(command)?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

/// `nginx -V` must show the stream module, built in or dynamic (Debian: a separate package).
fn nginx_stream() -> Result<Nginx, String> {
    let out = cmd::output(Command::new("nginx").arg("-V")).map_err(|e| format!("{e:#}"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next().unwrap_or("").trim().to_owned();
    let stream_module = if text.contains("--with-stream=dynamic") {
        let path = PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so");
        if !path.is_file() {
            return Err(format!("{} is missing", path.display()));
        }
        Some(path)
    } else if text.contains("--with-stream") {
        None
    } else {
        return Err("`nginx -V` shows no stream module".to_owned());
    };
    Ok(Nginx {
        version,
        stream_module,
    })
}

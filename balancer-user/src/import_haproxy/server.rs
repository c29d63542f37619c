//! `server` and `default-server` options: the ones mxlb has a key for, and why the others
//! are dropped. A `default-server` line sets options that later `server` lines start from.

use std::time::Duration;

use super::units::parse_time;

/// What a `server` line, or the `default-server` lines before it, asked for. `None`: not
/// said, so the next level (or mxlb's default) decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ServerOptions {
    pub send_proxy: Option<&'static str>,
    pub check: Option<bool>,
    pub inter: Option<Duration>,
    pub fastinter: Option<Duration>,
    pub downinter: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub weight: Option<u32>,
    pub backup: Option<bool>,
    pub maxconn: Option<u32>,
    pub disabled: Option<bool>,
}

/// Options that take a value, so that the value of one mxlb ignores is not mistaken for
/// an option of its own.
const WITH_VALUE: &[&str] = &[
    "addr",
    "agent-addr",
    "agent-inter",
    "agent-port",
    "agent-send",
    "alpn",
    "ca-file",
    "check-alpn",
    "check-proto",
    "check-sni",
    "ciphers",
    "ciphersuites",
    "cookie",
    "crl-file",
    "crt",
    "error-limit",
    "hash-key",
    "id",
    "init-addr",
    "log-proto",
    "max-reuse",
    "maxqueue",
    "minconn",
    "namespace",
    "observe",
    "on-error",
    "on-marked-down",
    "on-marked-up",
    "pool-low-conn",
    "pool-max-conn",
    "pool-purge-delay",
    "port",
    "proto",
    "redir",
    "resolve-net",
    "resolve-opts",
    "resolve-prefer",
    "resolvers",
    "shard",
    "sni",
    "slowstart",
    "socks4",
    "source",
    "tcp-ut",
    "track",
    "verify",
    "verifyhost",
    "ws",
];

/// Options that make the server something mxlb cannot talk to: such a server is dropped.
const FATAL: &[&str] = &["ssl", "check-ssl", "socks4"];

/// The outcome of reading a line's options.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    /// Why words of the line were not mapped (the line is then reported).
    pub lost: Vec<String>,
    /// Set when the server cannot be converted at all.
    pub fatal: Option<String>,
}

impl ServerOptions {
    /// Applies `words` (the options after the address, or after `default-server`).
    pub fn apply(&mut self, words: &[String]) -> Parsed {
        let mut parsed = Parsed::default();
        let mut words = words.iter().map(String::as_str);
        while let Some(word) = words.next() {
            if let Err(why) = self.option(word, &mut words) {
                parsed.lost.push(why);
            }
            if FATAL.contains(&word) {
                parsed.fatal = Some(format!(
                    "`{word}`: mxlb relays plain TCP and cannot speak TLS or SOCKS to a server"
                ));
            }
        }
        parsed
    }

    fn option<'a>(
        &mut self,
        word: &str,
        rest: &mut impl Iterator<Item = &'a str>,
    ) -> Result<(), String> {
        let mut value = || rest.next().ok_or_else(|| format!("`{word}` needs a value"));
        match word {
            "send-proxy" => self.send_proxy = Some("v1"),
            "send-proxy-v2" => self.send_proxy = Some("v2"),
            "no-send-proxy" | "no-send-proxy-v2" => self.send_proxy = Some("none"),
            "check" => self.check = Some(true),
            "no-check" => self.check = Some(false),
            "backup" => self.backup = Some(true),
            "no-backup" => self.backup = Some(false),
            "disabled" => self.disabled = Some(true),
            "enabled" => self.disabled = Some(false),
            "inter" => self.inter = Some(time(word, value()?)?),
            "fastinter" => self.fastinter = Some(time(word, value()?)?),
            "downinter" => self.downinter = Some(time(word, value()?)?),
            "rise" => self.rise = Some(count(word, value()?, 1)?),
            "fall" => self.fall = Some(count(word, value()?, 1)?),
            "weight" => {
                let weight = count(word, value()?, 0)?;
                if weight > 256 {
                    return Err(format!("weight {weight}: HAProxy and mxlb allow 0-256"));
                }
                self.weight = Some(weight);
            }
            "maxconn" => self.maxconn = Some(count(word, value()?, 0)?),
            // mxlb counts every failed client connect against a checked server, always.
            "observe" if value()? == "layer4" => {}
            "send-proxy-v2-ssl" | "send-proxy-v2-ssl-cn" => {
                self.send_proxy = Some("v2");
                return Err(format!(
                    "`{word}`: mxlb sends PROXY v2 without TLVs; written as send_proxy = \"v2\""
                ));
            }
            _ if WITH_VALUE.contains(&word) => {
                let value = value()?;
                return Err(format!("`{word} {value}` has no mxlb equivalent"));
            }
            _ => return Err(format!("`{word}` has no mxlb equivalent")),
        }
        Ok(())
    }
}

fn time(word: &str, text: &str) -> Result<Duration, String> {
    match parse_time(text) {
        Ok(duration) if duration.is_zero() => Err(format!("`{word} {text}`: must be above 0")),
        Ok(duration) => Ok(duration),
        Err(why) => Err(format!("`{word}`: {why}")),
    }
}

fn count(word: &str, text: &str, minimum: u32) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(number) if number >= minimum => Ok(number),
        _ => Err(format!("`{word} {text}`: not a whole number >= {minimum}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn mapped_options() {
        let mut options = ServerOptions::default();
        let parsed = options.apply(&words(
            "send-proxy-v2 check inter 2s fastinter 500 downinter 1m rise 3 fall 4 weight 20 \
             backup maxconn 100 observe layer4",
        ));
        assert!(parsed.lost.is_empty(), "{:?}", parsed.lost);
        assert_eq!(
            options,
            ServerOptions {
                send_proxy: Some("v2"),
                check: Some(true),
                inter: Some(Duration::from_secs(2)),
                fastinter: Some(Duration::from_millis(500)),
                downinter: Some(Duration::from_secs(60)),
                rise: Some(3),
                fall: Some(4),
                weight: Some(20),
                backup: Some(true),
                maxconn: Some(100),
                disabled: None,
            }
        );
    }

    #[test]
    fn later_words_override_earlier_ones() {
        let mut options = ServerOptions::default();
        options.apply(&words("check send-proxy weight 5"));
        options.apply(&words("no-check no-send-proxy"));
        assert_eq!(options.check, Some(false));
        assert_eq!(options.send_proxy, Some("none"));
        assert_eq!(options.weight, Some(5));
    }

    #[test]
    fn unmapped_options_are_named_with_their_values() {
        let mut options = ServerOptions::default();
        let parsed = options.apply(&words(
            "check slowstart 30s cookie a port 2525 agent-check weight 300",
        ));
        assert_eq!(
            parsed.lost,
            [
                "`slowstart 30s` has no mxlb equivalent",
                "`cookie a` has no mxlb equivalent",
                "`port 2525` has no mxlb equivalent",
                "`agent-check` has no mxlb equivalent",
                "weight 300: HAProxy and mxlb allow 0-256",
            ]
        );
        assert_eq!(options.check, Some(true));
        assert!(parsed.fatal.is_none());
    }

    #[test]
    fn tls_servers_cannot_be_converted() {
        let parsed = ServerOptions::default().apply(&words("ssl verify none check"));
        assert!(parsed.fatal.expect("fatal").contains("TLS"));
    }

    #[test]
    fn bad_values() {
        let mut options = ServerOptions::default();
        let parsed = options.apply(&words("inter fast rise 0 fall"));
        assert_eq!(parsed.lost.len(), 3, "{:?}", parsed.lost);
        assert_eq!(options, ServerOptions::default());
    }
}

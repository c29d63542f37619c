//! The outcome of one health check, in HAProxy's vocabulary.
//!
//! Operators coming from HAProxy read `L7OK/250 in 1ms` or `L4CON in 0ms` on the stats
//! page and in logs; mxlb uses the same words everywhere (checks, stats, logs) so that one
//! language describes a server's health.

use std::fmt;
use std::time::Duration;

/// What a check concluded, with HAProxy's names (`doc/configuration.txt`, "check_status").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckStatus {
    /// The TCP connection was established (and the PROXY header sent): a `tcp` check passed.
    L4Ok,
    /// The connection was not established within the check timeout.
    L4Tout,
    /// The connection was refused or failed (unreachable, reset, …).
    L4Con,
    /// The server answered something that is not a valid SMTP reply, or closed the
    /// connection instead of answering.
    L7Rsp,
    /// A reply did not arrive within the check timeout.
    L7Tout,
    /// A valid reply with a status other than 2xx.
    L7Sts,
    /// The whole SMTP dialogue succeeded: an `smtp` check passed.
    L7Ok,
}

impl CheckStatus {
    /// The word shown on the stats page and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::L4Ok => "L4OK",
            CheckStatus::L4Tout => "L4TOUT",
            CheckStatus::L4Con => "L4CON",
            CheckStatus::L7Rsp => "L7RSP",
            CheckStatus::L7Tout => "L7TOUT",
            CheckStatus::L7Sts => "L7STS",
            CheckStatus::L7Ok => "L7OK",
        }
    }

    /// HAProxy's one-line explanation, for tooltips and the documentation.
    pub fn description(self) -> &'static str {
        match self {
            CheckStatus::L4Ok => "Layer4 check passed",
            CheckStatus::L4Tout => "Layer4 timeout",
            CheckStatus::L4Con => "Layer4 connection problem",
            CheckStatus::L7Rsp => "Layer7 invalid response",
            CheckStatus::L7Tout => "Layer7 timeout",
            CheckStatus::L7Sts => "Layer7 wrong status",
            CheckStatus::L7Ok => "Layer7 check passed",
        }
    }

    /// Whether the check counts as a success for rise/fall.
    pub fn passed(self) -> bool {
        matches!(self, CheckStatus::L4Ok | CheckStatus::L7Ok)
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finished check: what it concluded, the SMTP code that decided it, how long it took
/// and a human explanation for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    pub status: CheckStatus,
    /// The reply code behind an L7 verdict (the HELO/EHLO code for L7OK, the offending
    /// code for L7STS); `None` for L4 results and replies that could not be parsed.
    pub code: Option<u16>,
    /// From the start of the connect to the verdict.
    pub duration: Duration,
    /// Why, in words: the OS error, the offending reply line, the step that timed out.
    /// May be empty.
    pub detail: String,
}

impl CheckResult {
    /// Whether the check counts as a success for rise/fall.
    pub fn passed(&self) -> bool {
        self.status.passed()
    }

    /// The stats-page form followed by the detail, for log lines:
    /// `L7STS/421 in 2ms: 421 4.3.2 Service shutting down`.
    pub fn describe(&self) -> String {
        if self.detail.is_empty() {
            self.to_string()
        } else {
            format!("{self}: {}", self.detail)
        }
    }
}

/// The stats-page form: `L7OK/250 in 1ms`, `L4CON in 0ms`.
impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.status.as_str())?;
        if let Some(code) = self.code {
            write!(f, "/{code}")?;
        }
        write!(f, " in {}ms", self.duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: CheckStatus, code: Option<u16>, ms: u64, detail: &str) -> CheckResult {
        CheckResult {
            status,
            code,
            duration: Duration::from_millis(ms),
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn statuses_use_haproxy_words() {
        let all = [
            (CheckStatus::L4Ok, "L4OK"),
            (CheckStatus::L4Tout, "L4TOUT"),
            (CheckStatus::L4Con, "L4CON"),
            (CheckStatus::L7Rsp, "L7RSP"),
            (CheckStatus::L7Tout, "L7TOUT"),
            (CheckStatus::L7Sts, "L7STS"),
            (CheckStatus::L7Ok, "L7OK"),
        ];
        for (status, word) in all {
            assert_eq!(status.to_string(), word);
            assert_eq!(
                status.passed(),
                matches!(status, CheckStatus::L4Ok | CheckStatus::L7Ok)
            );
            assert!(!status.description().is_empty());
        }
    }

    #[test]
    fn results_display_like_the_haproxy_stats_page() {
        let cases = [
            (
                result(CheckStatus::L7Ok, Some(250), 1, "250 mx"),
                "L7OK/250 in 1ms",
            ),
            (
                result(CheckStatus::L7Sts, Some(421), 3, ""),
                "L7STS/421 in 3ms",
            ),
            (result(CheckStatus::L4Con, None, 0, "x"), "L4CON in 0ms"),
            (
                result(CheckStatus::L7Tout, None, 2001, ""),
                "L7TOUT in 2001ms",
            ),
            (
                result(CheckStatus::L7Rsp, None, 1, "garbage"),
                "L7RSP in 1ms",
            ),
        ];
        for (result, shown) in cases {
            assert_eq!(result.to_string(), shown);
        }
    }

    #[test]
    fn describe_appends_the_detail() {
        let refused = result(CheckStatus::L4Con, None, 0, "Connection refused");
        assert_eq!(refused.describe(), "L4CON in 0ms: Connection refused");
        assert!(!refused.passed());
        let shutdown = result(
            CheckStatus::L7Sts,
            Some(421),
            2,
            "421 4.3.2 Service shutting down",
        );
        assert_eq!(
            shutdown.describe(),
            "L7STS/421 in 2ms: 421 4.3.2 Service shutting down"
        );
        let tcp = result(CheckStatus::L4Ok, None, 0, "");
        assert_eq!(tcp.describe(), "L4OK in 0ms");
        assert!(tcp.passed());
    }
}

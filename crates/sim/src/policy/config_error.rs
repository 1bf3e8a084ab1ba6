//! Why a peer policy's constructor refused its configuration.
//!
//! The peers reject the same values their real counterparts reject (llm-d's
//! filter refuses θ > 1 and a negative Δ, for example), so a misconfigured
//! run fails at construction instead of silently simulating something that
//! no deployment could run.

/// A peer policy's configuration cannot be simulated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A fleet of zero pods has nothing to route to.
    #[error("a policy needs at least one pod")]
    NoPods,
    /// One parameter is out of its range.
    #[error("{name} = {value}: {why}")]
    Invalid {
        name: &'static str,
        value: f64,
        why: &'static str,
    },
}

/// Checks `ok` for parameter `name`.
pub(crate) fn check(
    ok: bool,
    name: &'static str,
    value: f64,
    why: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { name, value, why })
    }
}

pub(crate) fn check_pods(pods: usize) -> Result<(), ConfigError> {
    if pods == 0 {
        Err(ConfigError::NoPods)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_parameter() {
        let e = check(false, "theta", 1.5, "must be at most 1").expect_err("rejected");
        assert_eq!(e.to_string(), "theta = 1.5: must be at most 1");
        assert_eq!(check_pods(0), Err(ConfigError::NoPods));
        assert!(check_pods(1).is_ok());
        assert!(check(true, "x", 0.0, "").is_ok());
    }
}

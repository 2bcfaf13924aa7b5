//! Lower bounds for distributing one file to N peers.

/// The fluid lower bound (Kumar and Ross, 2006) in seconds, for a file of
/// `bits` bits, a seed uploading `u_s` bit/s, peers uploading `u` bit/s each,
/// and the slowest peer downloading `d_min` bit/s:
/// `max(F/u_s, F/d_min, N F / (u_s + sum u_i))`.
pub fn t_min(bits: f64, u_s: f64, u: &[f64], d_min: f64) -> f64 {
    let n = u.len() as f64;
    let sum: f64 = u.iter().sum();
    (bits / u_s).max(bits / d_min).max(n * bits / (u_s + sum))
}

/// A central server sends every peer a full copy: `N F / u_s`.
pub fn t_http(bits: f64, u_s: f64, n: usize) -> f64 {
    n as f64 * bits / u_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_measured_baselines() {
        // The default storm of simulations/README.md: 13.2 MB at 20 Mbit/s,
        // T_min 5.28 s; HTTP 8 x 5.28 s at N = 8.
        let f = 13.2e6 * 8.0;
        assert!((t_min(f, 20e6, &[20e6; 32], 20e6) - 5.28).abs() < 0.01);
        assert!((t_http(f, 20e6, 8) - 42.24).abs() < 0.01);
        // A slow seed with no peer upload is bound by N F / u_s.
        assert!((t_min(f, 10e6, &[0.0; 4], 20e6) - 4.0 * f / 10e6).abs() < 1e-9);
    }
}

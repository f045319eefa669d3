//! Device identities: activated once against a cluster and cached on disk, so a rerun connects the same
//! devices without activating again.
//!
//! The cache lives under `<cache-dir>/<first 16 hex of SHA-256 of the CA file>/`, so devices of one
//! cluster are never offered to another; inside, `chunk-<k>.jsonl` holds devices `k*1000 ..` one JSON line
//! each (device id, certificate and PKCS#8 key in hex, and the owner the activation named: its device
//! address and server name). Lines cached before the owner was kept have none; those devices start on the
//! endpoints round-robin and follow the redirect. Chunks are written whole through a rename, so an
//! interrupted activation never leaves a half-written file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use courier_core::ids::DeviceId;
use courier_device::{Connector, DeviceCredentials, RedirectTarget};
use serde::{Deserialize, Serialize};

/// Devices per cache file.
pub const CHUNK: usize = 1000;

/// Activations in flight at once.
const ACTIVATION_CONCURRENCY: usize = 32;

#[derive(Serialize, Deserialize)]
struct Cached {
    id: DeviceId,
    cert: String,
    key: String,
    /// Where the device's first link goes; absent from caches written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<RedirectTarget>,
}

/// The cache directory for the cluster whose CA certificate is at `ca`.
pub fn cache_dir(root: &Path, ca: &Path) -> anyhow::Result<PathBuf> {
    let pem = std::fs::read(ca).with_context(|| format!("reading the CA {}", ca.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &pem);
    Ok(root.join(hex::encode(&digest.as_ref()[..8])))
}

fn chunk_path(dir: &Path, chunk: usize) -> PathBuf {
    dir.join(format!("chunk-{chunk}.jsonl"))
}

fn read_chunk(dir: &Path, chunk: usize) -> anyhow::Result<Vec<DeviceCredentials>> {
    let path = chunk_path(dir, chunk);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let cached: Cached = serde_json::from_str(line)?;
            Ok(DeviceCredentials {
                device_id: cached.id,
                cert_der: hex::decode(cached.cert)?,
                key_der: hex::decode(cached.key)?,
                owner: cached.owner,
            })
        })
        .collect::<anyhow::Result<_>>()
        .with_context(|| format!("{} is damaged; delete it to activate those devices again", path.display()))
}

fn write_chunk(dir: &Path, chunk: usize, devices: &[DeviceCredentials]) -> anyhow::Result<()> {
    let path = chunk_path(dir, chunk);
    let tmp = path.with_extension("tmp");
    let mut lines = Vec::new();
    for device in devices {
        let cached = Cached {
            id: device.device_id,
            cert: hex::encode(&device.cert_der),
            key: hex::encode(&device.key_der),
            owner: device.owner.clone(),
        };
        serde_json::to_writer(&mut lines, &cached)?;
        lines.push(b'\n');
    }
    // The chunk holds device private keys.
    courier_core::secret_file::write_secret(&tmp, &lines).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Makes sure devices `0..n` are activated and cached in `dir`; returns how many were activated now.
pub async fn ensure(
    dir: &Path,
    n: usize,
    endpoints: &[SocketAddr],
    connector: &Connector,
    enrolment_secret: &str,
    quiet: bool,
) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = std::time::Instant::now();
    let activated = Arc::new(AtomicUsize::new(0));
    for chunk in 0..n.div_ceil(CHUNK) {
        let mut devices = read_chunk(dir, chunk)?;
        let need = CHUNK.min(n - chunk * CHUNK);
        if devices.len() >= need {
            continue;
        }
        let missing = need - devices.len();
        let limit = Arc::new(tokio::sync::Semaphore::new(ACTIVATION_CONCURRENCY));
        let tasks: Vec<_> = (0..missing)
            .map(|i| {
                let (connector, limit, activated) = (connector.clone(), limit.clone(), activated.clone());
                let addr = endpoints[(chunk * CHUNK + i) % endpoints.len()];
                let secret = enrolment_secret.to_string();
                tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await?;
                    let credentials = courier_device::activate_via(&connector, addr, &secret)
                        .await
                        .with_context(|| format!("activating a device at {addr}"))?;
                    activated.fetch_add(1, Ordering::Relaxed);
                    anyhow::Ok(credentials)
                })
            })
            .collect();
        for task in tasks {
            devices.push(task.await??);
        }
        write_chunk(dir, chunk, &devices)?;
        if !quiet {
            eprintln!(
                "activated {} devices ({:.0}/s), cached in {}",
                activated.load(Ordering::Relaxed),
                activated.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(1e-3),
                dir.display()
            );
        }
    }
    Ok(activated.load(Ordering::Relaxed))
}

/// Devices `first .. first + count` from the cache (all must be there: `ensure` first).
pub fn load_range(dir: &Path, first: usize, count: usize) -> anyhow::Result<Vec<DeviceCredentials>> {
    let mut out = Vec::with_capacity(count);
    let mut index = first;
    while index < first + count {
        let chunk = index / CHUNK;
        let devices = read_chunk(dir, chunk)?;
        let start = index - chunk * CHUNK;
        let end = (first + count - chunk * CHUNK).min(CHUNK);
        anyhow::ensure!(
            devices.len() >= end,
            "{} holds {} devices, {end} needed",
            chunk_path(dir, chunk).display(),
            devices.len()
        );
        out.extend_from_slice(&devices[start..end]);
        index = (chunk + 1) * CHUNK;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(i: u8) -> DeviceCredentials {
        DeviceCredentials {
            device_id: DeviceId(u128::from(i) + 1),
            cert_der: vec![i, 1],
            key_der: vec![i, 2],
            owner: Some(RedirectTarget {
                device_addr: format!("127.0.0.{i}:5223"),
                server_name: format!("node-{i}.courier.internal"),
            }),
        }
    }

    #[test]
    fn ranges_cross_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let first: Vec<_> = (0..CHUNK).map(|i| fake((i % 200) as u8)).collect();
        write_chunk(dir.path(), 0, &first).unwrap();
        write_chunk(dir.path(), 1, &[fake(201), fake(202)]).unwrap();
        let got = load_range(dir.path(), CHUNK - 1, 3).unwrap();
        let ids: Vec<_> = got.iter().map(|d| d.device_id).collect();
        assert_eq!(ids, vec![first[CHUNK - 1].device_id, fake(201).device_id, fake(202).device_id]);
        assert!(load_range(dir.path(), CHUNK, 3).is_err(), "chunk 1 holds only two devices");
        #[cfg(unix)]
        for chunk in 0..2 {
            let mode = courier_core::secret_file::mode(&chunk_path(dir.path(), chunk)).unwrap();
            assert_eq!(mode, 0o600, "a chunk holds device private keys");
        }
    }

    #[test]
    fn owners_round_trip_and_old_lines_load_without_one() {
        let dir = tempfile::tempdir().unwrap();
        write_chunk(dir.path(), 0, &[fake(7)]).unwrap();
        let old = format!(r#"{{"id":"{}","cert":"0801","key":"0802"}}"#, fake(8).device_id);
        let mut text = std::fs::read_to_string(chunk_path(dir.path(), 0)).unwrap();
        text.push_str(&old);
        text.push('\n');
        std::fs::write(chunk_path(dir.path(), 0), text).unwrap();
        let got = load_range(dir.path(), 0, 2).unwrap();
        assert_eq!(got[0].owner, fake(7).owner);
        assert_eq!(got[1].device_id, fake(8).device_id);
        assert_eq!(got[1].owner, None, "a line cached before owners were kept has none");
    }

    #[test]
    fn a_damaged_chunk_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(chunk_path(dir.path(), 0), "{not json\n").unwrap();
        let error = load_range(dir.path(), 0, 1).unwrap_err();
        assert!(format!("{error:#}").contains("damaged"), "{error:#}");
    }
}

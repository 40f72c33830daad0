//! Timestamps in the formats the OpenStack APIs use.

use chrono::{DateTime, SecondsFormat, Utc};

/// Neutron's `created_at`/`updated_at`: `2026-11-22T03:44:17Z`.
pub fn neutron_now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Keystone's `expires_at`: `2026-11-22T03:44:17.000000Z`.
pub fn keystone_format(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

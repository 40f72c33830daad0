//! List queries: filters, `fields=`, sorting and pagination, applied to rendered API views.
//!
//! Working on the rendered JSON keeps one implementation for every resource and guarantees that
//! what a client filters on is exactly what it sees.

use isthmus_model::validate::parse_bool;
use isthmus_model::NeutronError;
use serde_json::{json, Map, Value};
use std::cmp::Ordering;

#[derive(Debug, Default)]
pub struct Query {
    pub filters: Vec<(String, Vec<String>)>,
    pub fields: Vec<String>,
    pub limit: Option<usize>,
    pub marker: Option<String>,
    pub page_reverse: bool,
    pub sort: Vec<(String, bool)>,
    tags_all: Vec<String>,
    tags_any: Vec<String>,
    not_tags_all: Vec<String>,
    not_tags_any: Vec<String>,
    fixed_ips: Vec<(String, String)>,
    /// Everything asked for except the page position, for building page links.
    carried: Vec<(String, String)>,
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=1&b=2&a=3` -> pairs, decoded, in order.
pub fn parse_pairs(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn split_tags(v: &str) -> Vec<String> {
    v.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect()
}

impl Query {
    pub fn parse(raw: &str) -> Result<Self, NeutronError> {
        let mut q = Query::default();
        let mut sort_keys = vec![];
        let mut sort_dirs = vec![];
        for (k, v) in parse_pairs(raw) {
            if k != "marker" && k != "page_reverse" {
                q.carried.push((k.clone(), v.clone()));
            }
            match k.as_str() {
                "fields" => q
                    .fields
                    .extend(v.split(',').filter(|f| !f.is_empty()).map(str::to_string)),
                "limit" => {
                    let n: i64 = v.parse().map_err(|_| {
                        NeutronError::bad_request(format!("Limit must be an integer 0 or greater and not '{v}'"))
                    })?;
                    if n < 0 {
                        return Err(NeutronError::bad_request(format!(
                            "Limit must be an integer 0 or greater and not '{v}'"
                        )));
                    }
                    q.limit = (n > 0).then_some(n as usize);
                }
                "marker" => q.marker = Some(v),
                "page_reverse" => q.page_reverse = parse_bool(&Value::String(v)).unwrap_or(false),
                "sort_key" => sort_keys.push(v),
                "sort_dir" => {
                    let asc = match v.as_str() {
                        "asc" => true,
                        "desc" => false,
                        _ => {
                            return Err(NeutronError::bad_request(format!(
                                "Sort direction must be one of asc, desc: {v}"
                            )))
                        }
                    };
                    sort_dirs.push(asc);
                }
                "tags" => q.tags_all.extend(split_tags(&v)),
                "tags-any" => q.tags_any.extend(split_tags(&v)),
                "not-tags" => q.not_tags_all.extend(split_tags(&v)),
                "not-tags-any" => q.not_tags_any.extend(split_tags(&v)),
                "fixed_ips" => {
                    let (fk, fv) = v
                        .split_once('=')
                        .ok_or_else(|| NeutronError::bad_request(format!("Invalid fixed_ips filter: {v}")))?;
                    match fk {
                        "ip_address" | "subnet_id" | "ip_address_substr" => {
                            q.fixed_ips.push((fk.to_string(), fv.to_string()))
                        }
                        _ => return Err(NeutronError::bad_request(format!("Invalid fixed_ips filter: {v}"))),
                    }
                }
                "verbose" => {}
                _ => match q.filters.iter_mut().find(|(f, _)| *f == k) {
                    Some((_, vals)) => vals.push(v),
                    None => q.filters.push((k, vec![v])),
                },
            }
        }
        if !sort_dirs.is_empty() && sort_dirs.len() != sort_keys.len() {
            return Err(NeutronError::bad_request(
                "The number of sort_keys and sort_dirs must be same",
            ));
        }
        q.sort = sort_keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, sort_dirs.get(i).copied().unwrap_or(true)))
            .collect();
        Ok(q)
    }

    /// The query's filters, for a resource to test plain string attributes of its stored objects
    /// before rendering them.
    pub fn prefilter(&self) -> Prefilter<'_> {
        Prefilter { filters: &self.filters }
    }

    /// Neutron's filter validation (on by default): a filter on an attribute the resource
    /// does not have is a 400.
    fn check_filters(&self, plural: &str) -> Result<(), NeutronError> {
        let Some(known) = filter_attributes(plural) else {
            return Ok(());
        };
        let invalid: Vec<String> = self
            .filters
            .iter()
            .filter(|(k, _)| !STANDARD_FILTERS.contains(&k.as_str()) && !known.contains(&k.as_str()))
            .map(|(k, _)| format!("'{k}'"))
            .collect();
        if invalid.is_empty() {
            return Ok(());
        }
        Err(NeutronError::bad_request(format!(
            "[{}] is invalid attribute for filtering",
            invalid.join(", ")
        )))
    }

    fn matches(&self, item: &Value) -> bool {
        let Some(obj) = item.as_object() else { return false };
        for (key, wanted) in &self.filters {
            // A valid filter on an attribute this caller's view lacks (admin-only ones) is
            // ignored.
            let Some(actual) = obj.get(key) else { continue };
            if !wanted.iter().any(|w| value_matches(actual, w)) {
                return false;
            }
        }
        if !self.tags_all.is_empty()
            || !self.tags_any.is_empty()
            || !self.not_tags_all.is_empty()
            || !self.not_tags_any.is_empty()
        {
            let tags: Vec<&str> = obj
                .get("tags")
                .and_then(|t| t.as_array())
                .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
                .unwrap_or_default();
            let has = |t: &String| tags.contains(&t.as_str());
            if !self.tags_all.iter().all(has) {
                return false;
            }
            if !self.tags_any.is_empty() && !self.tags_any.iter().any(has) {
                return false;
            }
            if !self.not_tags_all.is_empty() && self.not_tags_all.iter().all(has) {
                return false;
            }
            if self.not_tags_any.iter().any(has) {
                return false;
            }
        }
        if !self.fixed_ips.is_empty() {
            let ips = obj
                .get("fixed_ips")
                .and_then(|v| v.as_array())
                .cloned()
                .unwrap_or_default();
            // Each criterion must be met by some fixed IP of the port.
            for (k, v) in &self.fixed_ips {
                let hit = ips.iter().any(|ip| match k.as_str() {
                    "ip_address_substr" => ip
                        .get("ip_address")
                        .and_then(|a| a.as_str())
                        .is_some_and(|a| a.contains(v.as_str())),
                    _ => ip.get(k).and_then(|a| a.as_str()) == Some(v.as_str()),
                });
                if !hit {
                    return false;
                }
            }
        }
        true
    }

    /// Keeps only the requested fields (all when none were asked for).
    pub fn select_fields(&self, item: Value) -> Value {
        if self.fields.is_empty() {
            return item;
        }
        match item {
            Value::Object(mut m) => {
                let mut out = Map::new();
                for f in &self.fields {
                    if let Some(v) = m.remove(f) {
                        out.insert(f.clone(), v);
                    }
                }
                Value::Object(out)
            }
            other => other,
        }
    }

    /// Filters, sorts, pages and trims `items`; returns the collection body.
    pub fn apply(&self, items: Vec<Value>, plural: &str, url: &str) -> Result<Value, NeutronError> {
        self.check_filters(plural)?;
        let hidden = hidden_attributes(plural);
        let mut items: Vec<Value> = items
            .into_iter()
            .filter(|i| self.matches(i))
            .map(|mut i| {
                if let Some(m) = i.as_object_mut() {
                    for h in hidden {
                        m.remove(*h);
                    }
                }
                i
            })
            .collect();
        for (k, _) in &self.sort {
            if let Some(first) = items.first() {
                if first.get(k).is_none() {
                    return Err(NeutronError::bad_request(format!(
                        "{k} is invalid attribute for sort_key"
                    )));
                }
            }
        }
        let sort = self.sort.clone();
        items.sort_by(|a, b| {
            for (k, asc) in &sort {
                let o = cmp_values(a.get(k), b.get(k));
                if o != Ordering::Equal {
                    return if *asc { o } else { o.reverse() };
                }
            }
            cmp_values(a.get("id"), b.get("id"))
        });
        let mut links = vec![];
        if self.limit.is_some() || self.marker.is_some() {
            let pos = |id: &str| {
                items
                    .iter()
                    .position(|i| i.get("id").and_then(|v| v.as_str()) == Some(id))
            };
            let (start, end) = if !self.page_reverse {
                let start = match &self.marker {
                    Some(m) => pos(m).map(|p| p + 1).unwrap_or(0),
                    None => 0,
                };
                let end = self.limit.map(|l| (start + l).min(items.len())).unwrap_or(items.len());
                (start, end)
            } else {
                let end = match &self.marker {
                    Some(m) => pos(m).unwrap_or(items.len()),
                    None => items.len(),
                };
                let start = self.limit.map(|l| end.saturating_sub(l)).unwrap_or(0);
                (start, end)
            };
            let page: Vec<Value> = items[start..end].to_vec();
            if let Some(limit) = self.limit {
                links = self.page_links(&page, limit, url);
            }
            items = page;
        }
        let items: Vec<Value> = items.into_iter().map(|i| self.select_fields(i)).collect();
        let mut out = Map::new();
        out.insert(plural.to_string(), Value::Array(items));
        if !links.is_empty() {
            out.insert(format!("{plural}_links"), Value::Array(links));
        }
        Ok(Value::Object(out))
    }

    /// Links as Neutron makes them: going forward, `next` whenever the page is full (so the
    /// last full page has one, leading to an empty page) and `previous` always; going
    /// backward, `next` always and `previous` whenever the page is full. Clients such as
    /// tempest walk the pages both ways relying on exactly this.
    fn page_links(&self, page: &[Value], limit: usize, url: &str) -> Vec<Value> {
        let base = self.link_base(url);
        let id_of = |v: Option<&Value>| {
            v.and_then(|i| i.get("id"))
                .and_then(|i| i.as_str())
                .map(|id| format!("&marker={}", percent_encode(id)))
                .unwrap_or_default()
        };
        let full = page.len() >= limit;
        let mut links = vec![];
        if full || self.page_reverse {
            links.push(json!({"rel": "next", "href": format!("{base}{}", id_of(page.last()))}));
        }
        if full || !self.page_reverse {
            links.push(json!({"rel": "previous", "href": format!("{base}{}&page_reverse=True", id_of(page.first()))}));
        }
        links
    }

    /// The request's own query (re-encoded), without marker and direction.
    fn link_base(&self, url: &str) -> String {
        let parts: Vec<String> = self
            .carried
            .iter()
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect();
        format!("{url}?{}", parts.join("&"))
    }
}

/// Equality filters applied before rendering. A resource asks only about attributes its view
/// always shows as exactly that string (`id`, `name`, `project_id`, ...), so an object dropped
/// here is one [`Query::apply`] would drop: same results, less rendering.
pub struct Prefilter<'a> {
    filters: &'a [(String, Vec<String>)],
}

impl Prefilter<'_> {
    /// No filters: keeps everything.
    pub const NONE: Prefilter<'static> = Prefilter { filters: &[] };

    /// Whether an object whose view shows `attr` as the string `actual` passes the filters on
    /// `attr`.
    pub fn keeps(&self, attr: &str, actual: &str) -> bool {
        self.filters
            .iter()
            .filter(|(k, _)| k == attr)
            .all(|(_, wanted)| wanted.iter().any(|w| w == actual))
    }

    /// [`Self::keeps`] for the attributes every project-owned object shows: `id`, `name`,
    /// `project_id` and `tenant_id`.
    pub fn keeps_owned(&self, id: &str, name: &str, project_id: &str) -> bool {
        self.keeps("id", id)
            && self.keeps("name", name)
            && self.keeps("project_id", project_id)
            && self.keeps("tenant_id", project_id)
    }
}

/// Filters that apply to every resource: the standard attributes and the owner.
const STANDARD_FILTERS: &[&str] = &[
    "id",
    "project_id",
    "tenant_id",
    "description",
    "created_at",
    "updated_at",
    "revision_number",
];

/// The attributes each collection can be filtered on (Neutron's `is_filter` ones we render),
/// or `None` for collections without filter validation.
fn filter_attributes(plural: &str) -> Option<&'static [&'static str]> {
    Some(match plural {
        "networks" => &[
            "name",
            "admin_state_up",
            "shared",
            "router:external",
            "mtu",
            "status",
            "subnets",
            "port_security_enabled",
            "availability_zone_hints",
            "availability_zones",
            "ipv4_address_scope",
            "ipv6_address_scope",
            "is_default",
            "dns_domain",
            "provider:network_type",
            "provider:segmentation_id",
            "provider:physical_network",
        ],
        "subnets" => &[
            "name",
            "network_id",
            "ip_version",
            "cidr",
            "gateway_ip",
            "allocation_pools",
            "host_routes",
            "dns_nameservers",
            "enable_dhcp",
            "ipv6_ra_mode",
            "ipv6_address_mode",
            "subnetpool_id",
            "service_types",
            "segment_id",
            "shared",
        ],
        "ports" => &[
            "name",
            "network_id",
            "admin_state_up",
            "mac_address",
            "device_id",
            "device_owner",
            "status",
            "allowed_address_pairs",
            "port_security_enabled",
            "security_groups",
            "extra_dhcp_opts",
            "dns_name",
            "binding:vnic_type",
            "binding:host_id",
            "binding:vif_type",
            "binding:vif_details",
            "binding:profile",
        ],
        "routers" => &[
            "name",
            "admin_state_up",
            "status",
            "external_gateway_info",
            "routes",
            "availability_zone_hints",
            "availability_zones",
            "distributed",
            "ha",
            "flavor_id",
        ],
        "floatingips" => &[
            "floating_network_id",
            "floating_ip_address",
            "port_id",
            "fixed_ip_address",
            "router_id",
            "status",
        ],
        "security_groups" => &["name", "stateful", "security_group_rules"],
        "subnetpools" => &[
            "name",
            "ip_version",
            "prefixes",
            "default_prefixlen",
            "min_prefixlen",
            "max_prefixlen",
            "default_quota",
            "shared",
            "is_default",
            "address_scope_id",
        ],
        "address_scopes" => &["name", "ip_version", "shared"],
        "rbac_policies" => &["object_type", "object_id", "action", "target_tenant", "target_project"],
        "network_ip_availabilities" => &["network_id", "network_name", "project_id", "tenant_id"],
        "security_group_rules" => &[
            "security_group_id",
            "direction",
            "ethertype",
            "protocol",
            "port_range_min",
            "port_range_max",
            "remote_ip_prefix",
            "remote_group_id",
            "remote_address_group_id",
            "normalized_cidr",
            "belongs_to_default_sg",
        ],
        _ => return None,
    })
}

/// Attributes rendered for filtering only: Neutron filters on them but does not show them
/// (a subnet's `shared` is its network's).
fn hidden_attributes(plural: &str) -> &'static [&'static str] {
    match plural {
        "subnets" => &["shared"],
        _ => &[],
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn value_matches(actual: &Value, wanted: &str) -> bool {
    match actual {
        Value::String(s) => s == wanted,
        Value::Bool(b) => parse_bool(&Value::String(wanted.to_string())) == Some(*b),
        Value::Number(n) => n.to_string() == wanted,
        Value::Null => wanted.is_empty() || wanted == "None",
        Value::Array(a) => a.iter().any(|x| value_matches(x, wanted)),
        Value::Object(_) => false,
    }
}

fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().partial_cmp(&y.as_f64()).unwrap_or(Ordering::Equal)
        }
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None | Some(Value::Null), None | Some(Value::Null)) => Ordering::Equal,
        (None | Some(Value::Null), _) => Ordering::Less,
        (_, None | Some(Value::Null)) => Ordering::Greater,
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> Vec<Value> {
        (0..5)
            .map(|i| json!({"id": format!("id{i}"), "name": format!("n{}", 4 - i), "shared": i % 2 == 0, "tags": if i < 2 {vec!["red"]} else {vec!["blue"]}}))
            .collect()
    }

    #[test]
    fn repeated_filters_are_or() {
        let q = Query::parse("name=n4&name=n3").unwrap();
        let out = q.apply(items(), "networks", "http://x/v2.0/networks").unwrap();
        assert_eq!(out["networks"].as_array().unwrap().len(), 2);
        let q = Query::parse("shared=True").unwrap();
        let out = q.apply(items(), "networks", "u").unwrap();
        assert_eq!(out["networks"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn sort_and_page() {
        let q = Query::parse("sort_key=name&sort_dir=asc&limit=2").unwrap();
        let out = q.apply(items(), "networks", "u").unwrap();
        let names: Vec<&str> = out["networks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["n0", "n1"]);
        let next = out["networks_links"][0]["href"].as_str().unwrap();
        assert!(next.contains("marker=id3"), "{next}");
        let q = Query::parse("sort_key=name&sort_dir=asc&limit=2&marker=id3").unwrap();
        let out = q.apply(items(), "networks", "u").unwrap();
        let names: Vec<&str> = out["networks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["n2", "n3"]);
    }

    #[test]
    fn fields_and_tags() {
        let q = Query::parse("fields=id&tags-any=red").unwrap();
        let out = q.apply(items(), "networks", "u").unwrap();
        let arr = out["networks"].as_array().unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[0].as_object().unwrap().len(), 1);
        assert!(Query::parse("sort_dir=up&sort_key=name").is_err());
        assert!(Query::parse("limit=-1").is_err());
    }

    #[test]
    fn page_links_carry_every_filter_encoded() {
        let q = Query::parse("name=a%26b&tags=x&fixed_ips=ip_address%3D10.0.0.2&limit=1").unwrap();
        let items: Vec<Value> = (0..3)
            .map(|i| json!({"id": format!("id{i}"), "name": "a&b", "tags": ["x"], "fixed_ips": [{"ip_address": "10.0.0.2"}]}))
            .collect();
        let out = q.apply(items, "ports", "http://h/v2.0/ports").unwrap();
        let next = out["ports_links"][0]["href"].as_str().unwrap();
        assert!(next.contains("name=a%26b"), "{next}");
        assert!(next.contains("tags=x"), "{next}");
        assert!(next.contains("fixed_ips=ip_address%3D10.0.0.2"), "{next}");
        let raw = next.split_once('?').unwrap().1;
        let again = Query::parse(raw).unwrap();
        assert_eq!(again.marker.as_deref(), Some("id0"));
        assert_eq!(again.filters, vec![("name".to_string(), vec!["a&b".to_string()])]);
    }

    #[test]
    fn decoding() {
        assert_eq!(
            parse_pairs("fixed_ips=ip_address%3D10.0.0.2&a=b+c"),
            vec![
                ("fixed_ips".to_string(), "ip_address=10.0.0.2".to_string()),
                ("a".to_string(), "b c".to_string())
            ]
        );
        assert_eq!(parse_pairs("x=%zz%4"), vec![("x".to_string(), "%zz%4".to_string())]);
    }

    #[test]
    fn prefilter_drops_only_what_apply_drops() {
        let q = Query::parse("name=a&name=b&project_id=p&network_id=").unwrap();
        let pre = q.prefilter();
        assert!(pre.keeps("name", "a") && pre.keeps("name", "b") && !pre.keeps("name", "c"));
        assert!(pre.keeps("id", "anything"));
        assert!(pre.keeps_owned("x", "a", "p") && !pre.keeps_owned("x", "a", "q"));
        assert!(pre.keeps("network_id", "") && !pre.keeps("network_id", "n"));
        for (name, project) in [("a", "p"), ("c", "p"), ("a", "q")] {
            let item = json!({"id": "x", "name": name, "project_id": project, "tenant_id": project, "network_id": ""});
            assert_eq!(
                q.matches(&item),
                pre.keeps_owned("x", name, project),
                "{name} {project}"
            );
        }
        assert!(Prefilter::NONE.keeps("name", "z"));
    }
}

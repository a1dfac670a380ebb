//! The deployment's own certificate authority: makes the CA and issues role certificates for the
//! listener, agents, operators, viewers and hooks. Files are PEM; private keys are written 0600.
//! This is `backupctl certs`' engine and the tests' and demo's too.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::identity::Role;
use crate::{validate_name, Error, Result};

/// File names of the CA inside a certificate directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// The paths of one issued identity.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Creates a new CA in `dir`; refuses to overwrite an existing one, since every certificate it
/// issued would stop being trusted.
pub fn create_ca(dir: &Path, common_name: &str, days: i64) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cert_path = dir.join(CA_CERT);
    if cert_path.exists() {
        return Err(Error::Certificate {
            path: cert_path,
            reason: "a CA already exists here; remove it first if you really mean to replace it (every certificate it issued will stop working)".into(),
        });
    }
    let key = KeyPair::generate().map_err(|e| tls_err("generate CA key", e))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err("CA params", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "stillpoint");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(|e| tls_err("self-sign CA", e))?;
    write_file(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// Issues a certificate for `role:name` signed by the CA in `dir`. `hosts` are extra DNS names or
/// IP addresses the holder serves on; the name itself is always a DNS SAN, so a client can pin
/// the exact server it meant to reach (the listener dials agent `srv-a` as `srv-a`).
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    hosts: &[String],
    days: i64,
) -> Result<IssuedFiles> {
    validate_name("certificate name", name)?;
    let ca_path = dir.join(CA_CERT);
    let ca_pem = read_string(&ca_path)?;
    let ca_key_pem = read_string(&dir.join(CA_KEY))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| cert_err(&dir.join(CA_KEY), e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| cert_err(&ca_path, e))?;

    let mut sans = vec![name.to_string()];
    sans.extend(hosts.iter().filter(|h| h.as_str() != name).cloned());
    let mut params = CertificateParams::new(sans).map_err(|e| tls_err("certificate params", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::OrganizationName, "stillpoint");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, days);
    let key = KeyPair::generate().map_err(|e| tls_err("generate key", e))?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| tls_err("sign certificate", e))?;

    let files = IssuedFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        ca: ca_path,
    };
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A day of slack covers hosts whose clocks run a little behind the issuer's.
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn read_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn tls_err(what: &str, e: rcgen::Error) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

fn cert_err(path: &Path, e: rcgen::Error) -> Error {
    Error::Certificate { path: path.to_path_buf(), reason: e.to_string() }
}

/// What a certificate file says about its holder: enough to renew it as it was and to warn
/// before it expires.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub path: PathBuf,
    /// `None` for the CA (it has no role).
    pub role: Option<Role>,
    pub name: String,
    /// Its other DNS names and IP addresses (the holder's name is always the first SAN).
    pub hosts: Vec<String>,
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// Whole days left from `now` (negative once expired).
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_days()
    }
}

/// Reads the first certificate of a PEM file.
pub fn inspect(path: &Path) -> Result<CertInfo> {
    let pem = fs::read(path).map_err(|e| Error::io(path, e))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| Error::Certificate {
            path: path.to_path_buf(),
            reason: "no certificate in this PEM file".into(),
        })?
        .map_err(|e| Error::Certificate { path: path.to_path_buf(), reason: e.to_string() })?;
    let bad = |reason: String| Error::Certificate { path: path.to_path_buf(), reason };
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| bad(format!("unreadable: {e}")))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let role = match subject.iter_organizational_unit().next().and_then(|ou| ou.as_str().ok()) {
        Some(ou) => Some(ou.parse::<Role>().map_err(bad)?),
        None => None,
    };
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for general in &san.value.general_names {
            match general {
                x509_parser::extensions::GeneralName::DNSName(dns) if *dns != name => {
                    hosts.push((*dns).to_string());
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let addr = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    hosts.extend(addr);
                }
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after.to_datetime();
    Ok(CertInfo { path: path.to_path_buf(), role, name, hosts, not_after })
}

/// Reissues `NAME.pem` in `dir` from the CA there, with the role and names it had, a new key and
/// `days` of validity. The old files stay beside it as `NAME.pem.old` and `NAME.key.old` until
/// the next renewal, so a holder not yet given the new files can be put back.
pub fn renew(dir: &Path, name: &str, days: i64) -> Result<(CertInfo, IssuedFiles)> {
    validate_name("certificate name", name)?;
    let cert = dir.join(format!("{name}.pem"));
    let old = inspect(&cert)?;
    let Some(role) = old.role else {
        return Err(Error::Certificate {
            path: cert,
            reason: "it has no role (is it the CA?): renew a role certificate, or make a new CA with `backupctl certs init`".into(),
        });
    };
    if old.name != name {
        return Err(Error::Certificate {
            path: cert,
            reason: format!(
                "it was issued to {:?}, not {name:?}: its file name and holder disagree",
                old.name
            ),
        });
    }
    for ext in ["pem", "key"] {
        let from = dir.join(format!("{name}.{ext}"));
        let to = dir.join(format!("{name}.{ext}.old"));
        fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
    }
    let files = issue(dir, role, name, &old.hosts, days)?;
    Ok((old, files))
}

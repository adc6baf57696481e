//! Reading the certificate and key files, at each handshake: the trusted roots, the client's
//! certificate and key, and libpq's rule for the key's permissions.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Roots, Tls, TlsSetupError};

impl Tls {
    pub(super) fn load_roots(&self) -> Result<RootCertStore, TlsSetupError> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Some(Roots::System) => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(TlsSetupError::NoSystemRoots);
                }
            }
            Some(Roots::File(f)) if f.in_use() => {
                for cert in read_certs("sslrootcert", &f.path)? {
                    store.add(cert).map_err(|e| TlsSetupError::Pem {
                        what: "sslrootcert",
                        path: f.path.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
            Some(Roots::File(f)) => {
                return Err(TlsSetupError::NoRootCert { path: Some(f.path.clone()), mode: self.mode });
            }
            None => return Err(TlsSetupError::NoRootCert { path: None, mode: self.mode }),
        }
        Ok(store)
    }

    /// The client certificate chain and key, when there is a certificate to send.
    pub(super) fn identity(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsSetupError> {
        let Some(cert) = self.cert.as_ref().filter(|c| c.in_use()) else { return Ok(None) };
        let certs = read_certs("sslcert", &cert.path)?;
        let key = match &self.key {
            Some(key) if key.in_use() => key,
            key => {
                return Err(TlsSetupError::NoKey {
                    cert: cert.path.clone(),
                    key: key.as_ref().map(|k| k.path.clone()),
                });
            }
        };
        check_key_permissions(&key.path)?;
        let read = PrivateKeyDer::from_pem_file(&key.path).map_err(|e| pem_error("sslkey", &key.path, e))?;
        Ok(Some((certs, read)))
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem { what, path: path.to_owned(), message: "no certificate in it".into() });
    }
    Ok(certs)
}

fn pem_error(what: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> TlsSetupError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsSetupError::Read { what, path: path.to_owned(), source },
        other => TlsSetupError::Pem { what, path: path.to_owned(), message: other.to_string() },
    }
}

/// libpq's rule: a private key readable by others is refused.
pub(super) fn check_key_permissions(path: &Path) -> Result<(), TlsSetupError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsSetupError::Read {
        what: "sslkey",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode();
    let open = if meta.uid() == nix::unistd::geteuid().as_raw() {
        mode & 0o077 != 0
    } else {
        meta.uid() == 0 && mode & 0o037 != 0
    };
    if open {
        return Err(TlsSetupError::KeyPermissions { path: path.to_owned() });
    }
    Ok(())
}

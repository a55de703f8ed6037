//! A self-signed TLS certificate for the tests of the gateway's TLS listener and of an API
//! reached over TLS.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use ws2http::config::TlsFiles;

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files.
pub struct TestCert {
    /// The certificate, DER-encoded.
    pub cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
    /// The certificate's PEM file.
    pub cert_pem: PathBuf,
    /// The private key's PEM file.
    pub key_pem: PathBuf,
}

impl TestCert {
    /// A new certificate, in a directory of its own under the temporary directory.
    pub fn new() -> TestCert {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let generated = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("rcgen");
        let dir = std::env::temp_dir().join(format!(
            "ws2http-test-cert-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cert_pem = dir.join("cert.pem");
        let key_pem = dir.join("key.pem");
        std::fs::write(&cert_pem, generated.cert.pem()).unwrap();
        std::fs::write(&key_pem, generated.signing_key.serialize_pem()).unwrap();
        TestCert {
            cert_der: CertificateDer::from(generated.cert.der().to_vec()),
            key_der: generated.signing_key.serialize_der(),
            cert_pem,
            key_pem,
        }
    }

    /// The certificate and key files, as the gateway's `--tls-cert` and `--tls-key` take them.
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.cert_pem.clone(),
            key: self.key_pem.clone(),
        }
    }

    /// A TLS client that trusts only this certificate.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A TLS server with this certificate, speaking HTTP/1.1.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = PrivateKeyDer::try_from(self.key_der.clone()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![self.cert_der.clone()], key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        if let Some(dir) = self.cert_pem.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

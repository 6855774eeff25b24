//! Certificates for TLS tests, made with `openssl` in a directory of the test's: a CA
//! (`ca.pem`, `ca.key`), a server certificate for 127.0.0.1 and `localhost` (`server.pem`,
//! `server.key`) and a client certificate for mutual TLS (`client.pem`, `client.key`), both
//! signed by the CA, and another CA that signed nothing (`other-ca.pem`), for the "wrong CA"
//! cases. Valid for two days.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// True if `openssl` runs here.
pub fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Writes the CAs and certificates of the module docs into `dir` (which must exist).
pub fn certificates(dir: &Path) -> anyhow::Result<()> {
    for ca in ["ca", "other-ca"] {
        let (key, pem, subj) = (
            format!("{ca}.key"),
            format!("{ca}.pem"),
            format!("/CN=kappa test {ca}"),
        );
        openssl(
            dir,
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem,
                "-subj", &subj, "-days", "2",
            ],
        )?;
    }
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext).context("ext file")?;
        let subj = format!("/CN=kappa test {name}");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subj,
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-extfile",
                &extfile,
                "-days",
                "2",
            ],
        )?;
    }
    Ok(())
}

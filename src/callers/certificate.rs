//! The names by which a client certificate identifies a caller, typed as RFC 6125 types them: a
//! DNS name and a URI (subject alternative names), and the subject CN, which counts only on a
//! certificate without SANs (the CN of a certificate with SANs is not a name its CA vouched for
//! as an identity, and a DNS name must not pass for a URI or a CN). The callers file writes each
//! with its type: `dns:`, `uri:`, `cn:`.
use std::fmt;

/// One name of a client certificate, or one `certificate_names` entry of the callers file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertificateName {
    /// A DNS SAN, in lower case (DNS names are case-insensitive).
    Dns(String),
    /// A URI SAN (a SPIFFE id, say), exactly as written.
    Uri(String),
    /// The subject CN of a certificate that has no SANs.
    CommonName(String),
}

impl CertificateName {
    /// A `certificate_names` entry: `dns:NAME`, `uri:URI` or `cn:NAME` (the type in any case).
    /// An entry without a type is refused, with the entry it probably means.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let typed = raw
            .split_once(':')
            .map(|(kind, name)| (kind.to_ascii_lowercase(), name));
        let name = match typed {
            Some((kind, name)) if ["dns", "uri", "cn"].contains(&kind.as_str()) => {
                if name.is_empty() || name.len() > 1024 || name.chars().any(char::is_whitespace) {
                    return Err(format!(
                        "certificate name {raw:?}: the name after \"{kind}:\" must be 1 to 1024 characters without spaces"
                    ));
                }
                match kind.as_str() {
                    "dns" if name.contains('*') => {
                        return Err(format!(
                            "certificate name {raw:?}: DNS names are matched exactly; wildcards are not supported"
                        ))
                    }
                    "dns" => Self::Dns(name.to_ascii_lowercase()),
                    "uri" => Self::Uri(name.to_owned()),
                    _ => Self::CommonName(name.to_owned()),
                }
            }
            _ => {
                let kind = if raw.contains("://") { "uri" } else { "dns" };
                return Err(format!(
                    "certificate name {raw:?} has no type: write {:?} (or \"dns:\" for a DNS SAN, \"uri:\" for a URI SAN, \"cn:\" for the subject CN of a certificate without SANs)",
                    format!("{kind}:{raw}")
                ));
            }
        };
        Ok(name)
    }
}

impl fmt::Display for CertificateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => write!(f, "dns:{name}"),
            Self::Uri(uri) => write!(f, "uri:{uri}"),
            Self::CommonName(cn) => write!(f, "cn:{cn}"),
        }
    }
}

/// The names of a (verified) client certificate: its DNS and URI SANs; its subject CNs only
/// when it has no SANs at all (an IP address SAN counts as one).
pub fn certificate_names(der: &[u8]) -> Vec<CertificateName> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, certificate)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let sans = match certificate.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.clone(),
        // A certificate with two SAN extensions is malformed: it names nobody.
        Err(_) => return Vec::new(),
        Ok(None) => Vec::new(),
    };
    if sans.is_empty() {
        return certificate
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(|cn| CertificateName::CommonName(cn.to_owned()))
            .collect();
    }
    sans.iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(CertificateName::Dns(dns.to_ascii_lowercase())),
            GeneralName::URI(uri) => Some(CertificateName::Uri((*uri).to_owned())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn certificate(cn: &str, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    #[test]
    fn a_certificate_with_sans_is_named_by_them_and_not_by_its_cn() {
        let names = certificate_names(&certificate(
            "billing.prod.svc",
            vec![
                dns("Evil.svc"),
                SanType::URI("spiffe://prod/evil".try_into().unwrap()),
                SanType::IpAddress([10, 0, 0, 1].into()),
            ],
        ));
        assert_eq!(
            names,
            [
                CertificateName::Dns("evil.svc".into()),
                CertificateName::Uri("spiffe://prod/evil".into())
            ]
        );
        // An IP address SAN alone still makes the CN no name.
        let ip_only = certificate(
            "billing.prod.svc",
            vec![SanType::IpAddress([10, 0, 0, 1].into())],
        );
        assert!(certificate_names(&ip_only).is_empty());
        assert_eq!(
            certificate_names(&certificate("billing-7d9f", Vec::new())),
            [CertificateName::CommonName("billing-7d9f".into())]
        );
        assert!(certificate_names(b"not DER").is_empty());
    }

    #[test]
    fn entries_are_typed_and_untyped_ones_are_refused_with_the_typed_spelling() {
        assert_eq!(
            CertificateName::parse("DNS:Billing.Prod.Svc"),
            Ok(CertificateName::Dns("billing.prod.svc".into()))
        );
        assert_eq!(
            CertificateName::parse("uri:spiffe://prod/Billing"),
            Ok(CertificateName::Uri("spiffe://prod/Billing".into()))
        );
        assert_eq!(
            CertificateName::parse("cn:billing-7d9f"),
            Ok(CertificateName::CommonName("billing-7d9f".into()))
        );
        let untyped = CertificateName::parse("billing.prod.svc").unwrap_err();
        assert!(
            untyped.contains("has no type: write \"dns:billing.prod.svc\""),
            "{untyped}"
        );
        let spiffe = CertificateName::parse("spiffe://prod/billing").unwrap_err();
        assert!(
            spiffe.contains("write \"uri:spiffe://prod/billing\""),
            "{spiffe}"
        );
        for bad in ["dns:", "dns:*.prod.svc", "uri:a b", "ip:10.0.0.1"] {
            assert!(CertificateName::parse(bad).is_err(), "{bad:?}");
        }
    }
}

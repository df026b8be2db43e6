//! The benchmarks' SRTP override really changes the profile in use, and a call still carries
//! media with it (its own test binary: the override is process-wide).

use gateway_core::sim::bench::{install_srtp_override, Fanout, Srtp};

#[test]
fn forced_profiles_carry_media() {
    for (srtp, inferred) in [
        (Srtp::AesCm128HmacSha1_80, "AES_CM_128_HMAC_SHA1_80"),
        (Srtp::AeadAes128Gcm, "AEAD_AES_256_GCM"),
        (Srtp::AeadAes256Gcm, "AEAD_AES_256_GCM"),
    ] {
        install_srtp_override(srtp);
        let mut f = Fanout::new(2, 1000, 3);
        let before = f.received_video();
        let batch = f.prepare(20);
        assert!(f.forward(&batch) >= 40, "{srtp}");
        f.keepalive();
        assert_eq!(f.srtp_profile().as_deref(), Some(inferred), "{srtp}");
        // Each subscriber decrypted at least the keyframe it started on.
        assert!(before >= 2, "{srtp}: subscribers decrypted the setup media: {before}");
    }
}

package cache

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"strings"
	"unicode"
)

// Keys are written as one line of text, NAME:BASE64, the way Nix writes its
// binary cache keys: NAME says whose key it is (a farm, a CI pool,
// "ci.example.org-1"), BASE64 is the standard base64 of the raw ed25519 key
// (64 bytes for a secret key, 32 for a public one). A signature in an index
// has the same shape, NAME:BASE64 of the 64-byte ed25519 signature.

// SecretKey is an ed25519 key that signs the entries a host uploads.
type SecretKey struct {
	Name string
	key  ed25519.PrivateKey
}

// PublicKey is a trusted ed25519 key that checks entries' signatures.
type PublicKey struct {
	Name string
	key  ed25519.PublicKey
}

// Public returns the public half of k.
func (k *SecretKey) Public() PublicKey {
	return PublicKey{Name: k.Name, key: k.key.Public().(ed25519.PublicKey)}
}

// String returns the secret key in its file format, NAME:BASE64.
func (k *SecretKey) String() string {
	return k.Name + ":" + base64.StdEncoding.EncodeToString(k.key)
}

// String returns the public key as it goes into a trusted list,
// NAME:BASE64.
func (k PublicKey) String() string {
	return k.Name + ":" + base64.StdEncoding.EncodeToString(k.key)
}

// GenerateKey makes a new key pair named name from rnd (crypto/rand.Reader
// if nil).
func GenerateKey(name string, rnd io.Reader) (*SecretKey, error) {
	if err := validKeyName(name); err != nil {
		return nil, err
	}
	if rnd == nil {
		rnd = rand.Reader
	}
	_, priv, err := ed25519.GenerateKey(rnd)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return &SecretKey{Name: name, key: priv}, nil
}

func validKeyName(name string) error {
	printable := strings.IndexFunc(name, func(r rune) bool { return !unicode.IsPrint(r) }) < 0
	if name == "" || strings.ContainsAny(name, ":, ") || !printable {
		return fmt.Errorf("%w: name %q must be non-empty printable text without ':', ',' or spaces", ErrBadKey, name)
	}
	return nil
}

// splitKey parses NAME:BASE64 into the name and n raw bytes.
func splitKey(s string, n int, what string) (string, []byte, error) {
	name, b64, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok {
		return "", nil, fmt.Errorf("%w: %s is not NAME:BASE64", ErrBadKey, what)
	}
	if err := validKeyName(name); err != nil {
		return "", nil, err
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return "", nil, fmt.Errorf("%w: %s %q: %w", ErrBadKey, what, name, err)
	}
	if len(raw) != n {
		return "", nil, fmt.Errorf("%w: %s %q holds %d bytes, want %d", ErrBadKey, what, name, len(raw), n)
	}
	return name, raw, nil
}

// ParseSecretKey parses a secret key, NAME:BASE64 (surrounding white space
// is ignored).
func ParseSecretKey(s string) (*SecretKey, error) {
	name, raw, err := splitKey(s, ed25519.PrivateKeySize, "secret key")
	if err != nil {
		return nil, err
	}
	k := ed25519.PrivateKey(raw)
	// The last 32 bytes are the public key: check that they belong to the
	// seed, so a damaged file is refused instead of making bad signatures.
	if !ed25519.NewKeyFromSeed(k.Seed()).Equal(k) {
		return nil, fmt.Errorf("%w: secret key %q is damaged (its public half does not match)", ErrBadKey, name)
	}
	return &SecretKey{Name: name, key: k}, nil
}

// ReadSecretKeyFile reads a secret key file written by 'granary cache
// keygen' (one line, NAME:BASE64).
func ReadSecretKeyFile(path string) (*SecretKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("signing key: %w", err)
	}
	k, err := ParseSecretKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, path)
	}
	return k, nil
}

// ParsePublicKey parses one public key, NAME:BASE64.
func ParsePublicKey(s string) (PublicKey, error) {
	name, raw, err := splitKey(s, ed25519.PublicKeySize, "public key")
	if err != nil {
		return PublicKey{}, err
	}
	return PublicKey{Name: name, key: ed25519.PublicKey(raw)}, nil
}

// ParsePublicKeys parses a list of public keys separated by spaces, commas
// or newlines (the value of --cache-trusted-keys). Two keys with one name
// are an error: a signature names its key.
func ParsePublicKeys(s string) ([]PublicKey, error) {
	var keys []PublicKey
	seen := map[string]bool{}
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' || r == '\r' }) {
		k, err := ParsePublicKey(f)
		if err != nil {
			return nil, err
		}
		if seen[k.Name] {
			return nil, fmt.Errorf("%w: two trusted keys are named %q", ErrBadKey, k.Name)
		}
		seen[k.Name] = true
		keys = append(keys, k)
	}
	return keys, nil
}

// fingerprint is what an entry's signature covers: everything a reader
// relies on. The format version and a fixed prefix keep a signature from
// being valid for anything else.
func (idx *Index) fingerprint() []byte {
	return fmt.Appendf(nil, "granary-cache-entry;%d;%s;%s;%d;%d;%s",
		idx.Format, idx.ID, idx.Digest, idx.Size, idx.ArchiveSize, idx.ArchiveHash)
}

// sign adds k's signature to idx.
func (idx *Index) sign(k *SecretKey) {
	sig := ed25519.Sign(k.key, idx.fingerprint())
	idx.Signatures = append(idx.Signatures, k.Name+":"+base64.StdEncoding.EncodeToString(sig))
}

// Signer is the outcome of checking one of an entry's signatures.
type Signer struct {
	Name    string // key name the signature claims
	Trusted bool   // the name is one of the trusted keys
	Valid   bool   // the signature verifies with that trusted key
}

// signers checks every signature of idx against trusted.
func (idx *Index) signers(trusted []PublicKey) []Signer {
	fp := idx.fingerprint()
	var out []Signer
	for _, s := range idx.Signatures {
		name, b64, _ := strings.Cut(s, ":")
		sg := Signer{Name: name}
		for _, k := range trusted {
			if k.Name != name {
				continue
			}
			sg.Trusted = true
			sig, err := base64.StdEncoding.DecodeString(b64)
			sg.Valid = sg.Valid || err == nil && len(sig) == ed25519.SignatureSize && ed25519.Verify(k.key, fp, sig)
		}
		out = append(out, sg)
	}
	return out
}

// verify says why idx is not to be trusted, or "" if one of its signatures
// is by a trusted key and valid.
func (idx *Index) verify(trusted []PublicKey) Reason {
	if len(idx.Signatures) == 0 {
		return ReasonUnsigned
	}
	reason := ReasonUnknownKey
	for _, s := range idx.signers(trusted) {
		if s.Valid {
			return ""
		}
		if s.Trusted {
			reason = ReasonBadSignature
		}
	}
	return reason
}

// Reason says why a cache entry was rejected.
type Reason string

// Reasons for rejecting an entry when trusted keys are configured
// (WithTrustedKeys). They are the values of the reason label of
// granary_cache_rejected_total.
const (
	ReasonUnsigned        Reason = "unsigned"         // the index carries no signature
	ReasonUnknownKey      Reason = "unknown_key"      // no signature names a trusted key
	ReasonBadSignature    Reason = "bad_signature"    // a trusted key's signature does not verify: the index was changed
	ReasonArchiveMismatch Reason = "archive_mismatch" // the archive's length or SHA-256 is not what the signed index says
	ReasonDigestMismatch  Reason = "digest_mismatch"  // the unpacked tree does not match the signed digest
)

// Reasons lists every Reason, for metrics.
var Reasons = []Reason{ReasonUnsigned, ReasonUnknownKey, ReasonBadSignature, ReasonArchiveMismatch, ReasonDigestMismatch}

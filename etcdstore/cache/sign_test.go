package cache_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
)

func TestKeyFormat(t *testing.T) {
	k, err := cache.GenerateKey("farm.example-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	sec, pub := k.String(), k.Public().String()
	for _, s := range []string{sec, pub} {
		if !strings.HasPrefix(s, "farm.example-1:") || strings.ContainsAny(s, " \n") {
			t.Errorf("key %q is not NAME:BASE64 on one line", s)
		}
	}
	k2, err := cache.ParseSecretKey(sec + "\n")
	if err != nil {
		t.Fatalf("ParseSecretKey(its own output): %v", err)
	}
	if k2.String() != sec || k2.Public().String() != pub {
		t.Error("secret key does not round-trip")
	}
	p, err := cache.ParsePublicKey(pub)
	if err != nil || p.String() != pub {
		t.Errorf("ParsePublicKey(%q) = %v, %v", pub, p, err)
	}
	other, _ := cache.GenerateKey("ci-2", nil)
	keys, err := cache.ParsePublicKeys(" " + pub + ",\n" + other.Public().String() + "  ")
	if err != nil || len(keys) != 2 || keys[0].Name != "farm.example-1" || keys[1].Name != "ci-2" {
		t.Errorf("ParsePublicKeys = %v, %v; want the two keys in order", keys, err)
	}
	if keys, err := cache.ParsePublicKeys(""); err != nil || len(keys) != 0 {
		t.Errorf("ParsePublicKeys(\"\") = %v, %v; want none", keys, err)
	}

	// A secret key whose public half was damaged must not load.
	_, b64, _ := strings.Cut(sec, ":")
	damaged := "farm.example-1:" + b64[:60] + strings.Map(func(r rune) rune {
		if r == 'A' {
			return 'B'
		}
		return 'A'
	}, b64[60:61]) + b64[61:]
	for _, tc := range []struct{ name, s string }{
		{"no colon", "farmkey"},
		{"empty name", ":" + b64},
		{"space in name", "my farm:" + b64},
		{"not base64", "farm:!!!"},
		{"public key as secret", pub},
		{"damaged public half", damaged},
	} {
		if _, err := cache.ParseSecretKey(tc.s); !errors.Is(err, cache.ErrBadKey) {
			t.Errorf("%s: ParseSecretKey(%q) = %v; want ErrBadKey", tc.name, tc.s, err)
		}
	}
	for _, s := range []string{sec, "farm:" + b64[:10], pub + "," + pub} {
		if _, err := cache.ParsePublicKeys(s); !errors.Is(err, cache.ErrBadKey) {
			t.Errorf("ParsePublicKeys(%.30q…) = %v; want ErrBadKey", s, err)
		}
	}
	if _, err := cache.GenerateKey("a:b", nil); !errors.Is(err, cache.ErrBadKey) {
		t.Errorf("GenerateKey with ':' in the name: %v; want ErrBadKey", err)
	}
}

// objects reads and writes a cache's raw objects behind its back, to
// damage entries as a hostile server would.
type objects interface {
	get(t *testing.T, name string) []byte
	put(t *testing.T, name string, b []byte)
}

type dirObjects string

func (d dirObjects) get(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(string(d), name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (d dirObjects) put(t *testing.T, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(string(d), name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// editIndex rewrites id's index through fn.
func editIndex(t *testing.T, objs objects, id string, fn func(*cache.Index)) {
	t.Helper()
	var idx cache.Index
	if err := json.Unmarshal(objs.get(t, id+".json"), &idx); err != nil {
		t.Fatal(err)
	}
	fn(&idx)
	b, err := json.Marshal(idx)
	if err != nil {
		t.Fatal(err)
	}
	objs.put(t, id+".json", b)
}

// tamperCase is one way a hostile cache (or a host without the farm's key)
// can change an entry, and the reason a consumer must give for refusing it.
type tamperCase struct {
	name   string
	reason cache.Reason
	// apply damages the entry id that key k signed; upload stores the
	// tree with any signing key.
	apply func(t *testing.T, objs objects, id string, upload func(*cache.SecretKey))
}

var tamperCases = []tamperCase{
	{"unsigned entry", cache.ReasonUnsigned, func(t *testing.T, _ objects, _ string, upload func(*cache.SecretKey)) {
		upload(nil)
	}},
	{"signed by an unknown key", cache.ReasonUnknownKey, func(t *testing.T, _ objects, _ string, upload func(*cache.SecretKey)) {
		rogue, _ := cache.GenerateKey("rogue-1", nil)
		upload(rogue)
	}},
	{"re-signed with a forged key of the trusted name", cache.ReasonBadSignature, func(t *testing.T, _ objects, _ string, upload func(*cache.SecretKey)) {
		forged, _ := cache.GenerateKey("farm-1", nil)
		upload(forged)
	}},
	{"tampered index", cache.ReasonBadSignature, func(t *testing.T, objs objects, id string, _ func(*cache.SecretKey)) {
		editIndex(t, objs, id, func(idx *cache.Index) { idx.Digest = "sha256:" + zeros })
	}},
	{"signature stripped", cache.ReasonUnsigned, func(t *testing.T, objs objects, id string, _ func(*cache.SecretKey)) {
		editIndex(t, objs, id, func(idx *cache.Index) { idx.Signatures = nil })
	}},
	{"tampered archive", cache.ReasonArchiveMismatch, func(t *testing.T, objs objects, id string, _ func(*cache.SecretKey)) {
		b := objs.get(t, id+".tar.zst")
		b[len(b)/2] ^= 0x5a
		objs.put(t, id+".tar.zst", b)
	}},
	{"archive replaced by another valid one", cache.ReasonArchiveMismatch, func(t *testing.T, objs objects, id string, upload func(*cache.SecretKey)) {
		// The archive of another signed package, its length padded to
		// the signed one: only the hash tells them apart.
		b := objs.get(t, "other.tar.zst")
		want := len(objs.get(t, id+".tar.zst"))
		for len(b) < want {
			b = append(b, 0)
		}
		objs.put(t, id+".tar.zst", b[:want])
	}},
}

// exerciseSigned checks signing and verification on the caches open makes
// (all on one location), whose objects objs reaches.
func exerciseSigned(t *testing.T, open func(t *testing.T, opts ...cache.Option) *cache.Remote, objs objects) {
	ctx := context.Background()
	farm, err := cache.GenerateKey("farm-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	src, rec := published(t)
	otherSrc := t.TempDir()
	writeFile(t, filepath.Join(otherSrc, "other"), "another package\n")
	otherDigest, otherSize, err := etcdstore.TreeDigest(otherSrc)
	if err != nil {
		t.Fatal(err)
	}
	upload := func(t *testing.T, id string, k *cache.SecretKey) {
		t.Helper()
		var opts []cache.Option
		if k != nil {
			opts = append(opts, cache.WithSignKey(k))
		}
		dir, r := src, rec
		if id == "other" {
			dir, r = otherSrc, etcdstore.PackageRecord{Digest: otherDigest, Size: otherSize}
		}
		if err := open(t, opts...).Store(ctx, id, dir, r); err != nil {
			t.Fatal(err)
		}
	}
	consumer := open(t, cache.WithTrustedKeys(farm.Public()))

	t.Run("signed entry", func(t *testing.T) {
		upload(t, "pkg", farm)
		dst := t.TempDir()
		if ok, err := consumer.Fetch(ctx, "pkg", dst); !ok || err != nil {
			t.Fatalf("Fetch of a signed entry = %v, %v; want a hit", ok, err)
		}
		if got := digest(t, dst); got != rec.Digest {
			t.Errorf("fetched digest %s, want %s", got, rec.Digest)
		}
		ec, err := consumer.Verify(ctx, "pkg")
		if err != nil {
			t.Fatal(err)
		}
		if ec.Reason != "" || len(ec.Signers) != 1 || ec.Signers[0] != (cache.Signer{Name: "farm-1", Trusted: true, Valid: true}) {
			t.Errorf("Verify = reason %q, signers %+v; want one valid trusted signer farm-1", ec.Reason, ec.Signers)
		}
		// Without trusted keys, a signed entry is fetched as any other.
		if ok, err := open(t).Fetch(ctx, "pkg", t.TempDir()); !ok || err != nil {
			t.Errorf("Fetch without trusted keys = %v, %v; want a hit", ok, err)
		}
	})

	for _, tc := range tamperCases {
		t.Run(tc.name, func(t *testing.T) {
			upload(t, "pkg", farm)
			upload(t, "other", farm)
			tc.apply(t, objs, "pkg", func(k *cache.SecretKey) { upload(t, "pkg", k) })
			before := consumer.Stats().Rejected[tc.reason]
			dst := t.TempDir()
			ok, err := consumer.Fetch(ctx, "pkg", dst)
			var rej *cache.RejectedError
			if ok || !errors.As(err, &rej) || !errors.Is(err, cache.ErrRejected) {
				t.Fatalf("Fetch = %v, %v; want a *RejectedError", ok, err)
			}
			if rej.Reason != tc.reason {
				t.Errorf("rejected for %q (%v), want %q", rej.Reason, err, tc.reason)
			}
			if got := consumer.Stats().Rejected[tc.reason] - before; got != 1 {
				t.Errorf("Stats.Rejected[%s] went up by %d, want 1", tc.reason, got)
			}
			if ents, _ := os.ReadDir(dst); len(ents) != 0 {
				t.Errorf("a rejected entry was unpacked: %d entries in the output directory", len(ents))
			}
			ec, err := consumer.Verify(ctx, "pkg")
			if err != nil || ec.Reason != tc.reason {
				t.Errorf("Verify = %+v, %v; want reason %q", ec, err, tc.reason)
			}
			t.Logf("Fetch: %v", err)
		})
	}
	t.Run("verify absent", func(t *testing.T) {
		if _, err := consumer.Verify(ctx, "absent"); !errors.Is(err, cache.ErrNotCached) {
			t.Errorf("Verify(absent) = %v; want ErrNotCached", err)
		}
	})
}

func TestDirSigned(t *testing.T) {
	base := t.TempDir()
	open := func(t *testing.T, opts ...cache.Option) *cache.Remote {
		r, err := cache.NewDir(base, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	exerciseSigned(t, open, dirObjects(base))
}

func TestHTTPSigned(t *testing.T) {
	n := startNginx(t)
	open := func(t *testing.T, opts ...cache.Option) *cache.Remote {
		return openHTTP(t, n.url+"/cache/", opts...)
	}
	exerciseSigned(t, open, dirObjects(filepath.Join(n.dir, "www", "cache")))
}

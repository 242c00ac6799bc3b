package cache_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
)

// published makes a sealed package tree as etcdstore publishes it and
// returns its directory and record.
func published(t testing.TB) (string, etcdstore.PackageRecord) {
	t.Helper()
	dir := t.TempDir()
	makeTree(t, dir)
	d, size, err := etcdstore.TreeDigest(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, etcdstore.PackageRecord{BuiltBy: "test", Digest: d, Size: size, BuiltAt: time.Now()}
}

// exerciseRemote runs what every Remote must do against r, whose objects
// live in objDir on this machine (so the test can damage them).
func exerciseRemote(t *testing.T, r *cache.Remote, objDir string) {
	ctx := context.Background()
	src, rec := published(t)
	obj := func(name string) string { return filepath.Join(objDir, name) }

	t.Run("miss", func(t *testing.T) {
		ok, err := r.Fetch(ctx, "absent", t.TempDir())
		if ok || err != nil {
			t.Fatalf("Fetch of an absent package = %v, %v; want false, nil", ok, err)
		}
		if ok, err := r.Contains(ctx, "absent"); ok || err != nil {
			t.Fatalf("Contains(absent) = %v, %v; want false, nil", ok, err)
		}
	})

	t.Run("store then fetch", func(t *testing.T) {
		// A miss first, then a Store: the miss must not be remembered.
		if ok, err := r.Fetch(ctx, "pkg", t.TempDir()); ok || err != nil {
			t.Fatalf("Fetch before Store = %v, %v; want a miss", ok, err)
		}
		if err := r.Store(ctx, "pkg", src, rec); err != nil {
			t.Fatalf("Store: %v", err)
		}
		for _, n := range []string{"pkg.tar.zst", "pkg.json"} {
			if _, err := os.Stat(obj(n)); err != nil {
				t.Errorf("after Store: %v", err)
			}
		}
		if ok, err := r.Contains(ctx, "pkg"); !ok || err != nil {
			t.Errorf("Contains(pkg) = %v, %v; want true, nil", ok, err)
		}
		dst := t.TempDir()
		ok, err := r.Fetch(ctx, "pkg", dst)
		if !ok || err != nil {
			t.Fatalf("Fetch = %v, %v; want a hit", ok, err)
		}
		if got := digest(t, dst); got != rec.Digest {
			t.Errorf("fetched digest %s, want %s", got, rec.Digest)
		}
		st := r.Stats()
		if st.Hits < 1 || st.Misses < 1 || st.Uploads < 1 || st.BytesUp == 0 || st.BytesDown == 0 {
			t.Errorf("Stats = %+v, want hits, misses, uploads and bytes counted", st)
		}
	})

	t.Run("changed tree is not indexed", func(t *testing.T) {
		bad := rec
		bad.Size++
		if err := r.Store(ctx, "changed", src, bad); err == nil {
			t.Fatal("Store of a tree that does not match its record succeeded")
		}
		if _, err := os.Stat(obj("changed.json")); err == nil {
			t.Error("an index was written for a tree that failed to pack")
		}
	})

	damage := []struct {
		name  string
		apply func(t *testing.T)
	}{
		{"truncated archive", func(t *testing.T) { truncate(t, obj("pkg.tar.zst")) }},
		{"flipped bytes", func(t *testing.T) { flip(t, obj("pkg.tar.zst")) }},
		{"wrong digest in index", func(t *testing.T) { rewrite(t, obj("pkg.json"), rec.Digest, "sha256:"+zeros) }},
		{"corrupt index", func(t *testing.T) { writeFile(t, obj("pkg.json"), "{not json") }},
	}
	for _, d := range damage {
		t.Run(d.name, func(t *testing.T) {
			if err := r.Store(ctx, "pkg", src, rec); err != nil {
				t.Fatal(err)
			}
			d.apply(t)
			ok, err := r.Fetch(ctx, "pkg", t.TempDir())
			if ok || err == nil {
				t.Fatalf("Fetch of a damaged entry = %v, %v; want an error", ok, err)
			}
			t.Logf("Fetch: %v", err)
		})
	}
	t.Run("index without archive", func(t *testing.T) {
		if err := r.Store(ctx, "pkg", src, rec); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(obj("pkg.tar.zst")); err != nil {
			t.Fatal(err)
		}
		if ok, err := r.Fetch(ctx, "pkg", t.TempDir()); ok || err != nil {
			t.Fatalf("Fetch with the archive gone = %v, %v; want a miss", ok, err)
		}
	})
	t.Run("invalid id", func(t *testing.T) {
		if _, err := r.Fetch(ctx, "../etc", t.TempDir()); err == nil {
			t.Error("Fetch of an invalid ID succeeded")
		}
	})
}

const zeros = "0000000000000000000000000000000000000000000000000000000000000000"

func truncate(t *testing.T, p string) {
	fi, err := os.Stat(p)
	if err == nil {
		err = os.Truncate(p, fi.Size()/2)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func flip(t *testing.T, p string) {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(b) / 3; i < len(b)/3+16 && i < len(b); i++ {
		b[i] ^= 0x5a
	}
	writeFile(t, p, string(b))
}

func rewrite(t *testing.T, p, old, new string) {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s does not hold %q", p, old)
	}
	writeFile(t, p, strings.Replace(string(b), old, new, 1))
}

func writeFile(t testing.TB, p, content string) {
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDir(t *testing.T) {
	base := t.TempDir()
	r, err := cache.Open("file://" + base)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	exerciseRemote(t, r, base)

	t.Run("no temporary files left", func(t *testing.T) {
		ents, _ := os.ReadDir(base)
		for _, e := range ents {
			if e.Name()[0] == '.' {
				t.Errorf("left behind: %s", e.Name())
			}
		}
	})
}

// unwritableDir returns a directory cache whose directory was then
// replaced by a file: every write fails, as on a read-only mount, even for
// root (which a read-only mode would not stop).
func unwritableDir(t *testing.T) *cache.Remote {
	t.Helper()
	base := t.TempDir()
	r, err := cache.NewDir(base)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	writeFile(t, base, "")
	return r
}

func TestDirReadOnlyUploadFails(t *testing.T) {
	r := unwritableDir(t)
	src, rec := published(t)
	if err := r.Store(context.Background(), "pkg", src, rec); err == nil {
		t.Fatal("Store into an unwritable cache succeeded")
	}
	if st := r.Stats(); st.UploadFailures != 1 {
		t.Errorf("UploadFailures = %d, want 1", st.UploadFailures)
	}
}

func TestOpen(t *testing.T) {
	for _, tc := range []struct {
		url string
		ok  bool
	}{
		{"http://127.0.0.1:1/cache", true},
		{"https://user:secret@cache.example/base/", true},
		{"file://" + t.TempDir(), true},
		{"file:///definitely/not/there", false},
		{"file://host/path", false},
		{"file:relative", false},
		{"s3://bucket/x", true},
		{"s3://bucket/x?endpoint=http://127.0.0.1:1", true},
		{"gs://bucket/x", false},
		{"/just/a/path", false},
		{"ftp://x/", false},
		{"http://x/?q=1", false},
	} {
		r, err := cache.Open(tc.url)
		if (err == nil) != tc.ok {
			t.Errorf("Open(%q) = %v, want ok=%v", tc.url, err, tc.ok)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("Open(%q): error shows the password: %v", tc.url, err)
		}
		if err == nil {
			if strings.Contains(r.String(), "secret") {
				t.Errorf("String() shows the password: %s", r)
			}
			r.Close()
		}
	}
	if _, err := cache.Open("http://x/", cache.WithTimeout(0)); err == nil {
		t.Error("Open with a zero timeout succeeded")
	}
	if _, err := cache.Open("http://u:p@x/", cache.WithBearerToken("t")); err == nil {
		t.Error("Open with both URL credentials and a bearer token succeeded")
	}
}

func TestOpenRejectsBadFetchOptions(t *testing.T) {
	for _, opt := range []cache.Option{cache.WithFetchBudget(0), cache.WithPartSize(1 << 20)} {
		if _, err := cache.Open("http://x/", opt); err == nil {
			t.Error("Open with a zero fetch budget or a 1 MiB part size succeeded")
		}
	}
}

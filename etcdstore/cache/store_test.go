package cache_test

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/internal/etcdtest"
)

// recorder keeps a store's events and lets a test wait for one.
type recorder struct {
	mu     sync.Mutex
	events []etcdstore.Event
	change chan struct{} // closed and replaced at each event
}

func newRecorder() *recorder { return &recorder{change: make(chan struct{})} }

func (r *recorder) hook(e etcdstore.Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	close(r.change)
	r.change = make(chan struct{})
	r.mu.Unlock()
}

func (r *recorder) find(kind etcdstore.EventKind, id string) (etcdstore.Event, bool, chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		if e.Kind == kind && e.ID == id {
			return e, true, nil
		}
	}
	return etcdstore.Event{}, false, r.change
}

func (r *recorder) seen(kind etcdstore.EventKind, id string) bool {
	_, ok, _ := r.find(kind, id)
	return ok
}

// wait returns the first event of kind for id, waiting at most 30s for it.
func (r *recorder) wait(t *testing.T, kind etcdstore.EventKind, id string) etcdstore.Event {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		e, ok, change := r.find(kind, id)
		if ok {
			return e
		}
		select {
		case <-change:
		case <-timeout:
			t.Fatalf("no %v event for %q within 30s", kind, id)
		}
	}
}

// host is one cluster's participant: its own embedded etcd and root.
type host struct {
	store *etcdstore.Store
	root  string
	ev    *recorder
}

func newHost(t *testing.T, c etcdstore.Cache) *host {
	t.Helper()
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	h := &host{root: t.TempDir(), ev: newRecorder()}
	s, err := etcdstore.New(context.Background(), cli, h.root, etcdstore.WithTTL(3*time.Second),
		etcdstore.WithCache(c), etcdstore.WithEvents(h.ev.hook))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	h.store = s
	return h
}

// writeDeterministic is a builder's output that is the same on every host.
func writeDeterministic(dir, id string) error {
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "run"), []byte("#!/bin/sh\necho "+id+"\n"), 0o755); err != nil {
		return err
	}
	return os.Symlink("bin/run", filepath.Join(dir, "run"))
}

func (h *host) build(t *testing.T, id string, builder func(context.Context) error) etcdstore.PackageRecord {
	t.Helper()
	if err := h.store.Handle(id).BuildContext(context.Background(), builder); err != nil {
		t.Fatalf("Build %q: %v", id, err)
	}
	info, err := h.store.Inspect(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if info.Package == nil {
		t.Fatalf("%q is not published after Build", id)
	}
	return *info.Package
}

func deterministic(h *host, id string) func(context.Context) error {
	return func(context.Context) error { return writeDeterministic(h.store.Handle(id).OutputDirectory(), id) }
}

func mustNotRun(t *testing.T) func(context.Context) error {
	return func(context.Context) error {
		t.Errorf("the builder ran although the remote cache has the package")
		return errors.New("builder must not run")
	}
}

func TestStoreWithDirCache(t *testing.T) {
	base := t.TempDir()
	rc, err := cache.NewDir(base)
	if err != nil {
		t.Fatal(err)
	}
	a := newHost(t, rc)
	b := newHost(t, rc)

	t.Run("built on A, fetched on B without building", func(t *testing.T) {
		recA := a.build(t, "pkg", func(context.Context) error { makeTree(t, a.store.Handle("pkg").OutputDirectory()); return nil })
		a.ev.wait(t, etcdstore.EventCacheStored, "pkg")
		for _, n := range []string{"pkg.tar.zst", "pkg.json"} {
			if _, err := os.Stat(filepath.Join(base, n)); err != nil {
				t.Fatalf("after the upload: %v", err)
			}
		}
		recB := b.build(t, "pkg", mustNotRun(t))
		if !b.ev.seen(etcdstore.EventCacheHit, "pkg") {
			t.Error("no EventCacheHit on B")
		}
		if recB.Digest != recA.Digest || recB.Size != recA.Size || !recB.FromCache {
			t.Errorf("B published %+v, want A's digest %s and size %d, from the cache", recB, recA.Digest, recA.Size)
		}
		if err := b.store.Verify(context.Background(), "pkg"); err != nil {
			t.Errorf("Verify on B: %v", err)
		}
		if b.ev.seen(etcdstore.EventCacheStored, "pkg") {
			t.Error("B uploaded a package it got from the cache")
		}
	})

	damage := []struct {
		name  string
		apply func(t *testing.T, id string)
	}{
		{"truncated archive", func(t *testing.T, id string) { truncate(t, filepath.Join(base, id+".tar.zst")) }},
		{"flipped bytes", func(t *testing.T, id string) { flip(t, filepath.Join(base, id+".tar.zst")) }},
		{"wrong digest in index", func(t *testing.T, id string) {
			rec, _ := a.store.Inspect(context.Background(), id)
			rewrite(t, filepath.Join(base, id+".json"), rec.Package.Digest, "sha256:"+zeros)
		}},
	}
	for i, d := range damage {
		t.Run("falls back to building: "+d.name, func(t *testing.T) {
			id := fmt.Sprintf("damaged-%d", i)
			recA := a.build(t, id, deterministic(a, id))
			a.ev.wait(t, etcdstore.EventCacheStored, id)
			d.apply(t, id)
			ran := false
			recB := b.build(t, id, func(ctx context.Context) error { ran = true; return deterministic(b, id)(ctx) })
			if !ran || b.ev.seen(etcdstore.EventCacheHit, id) || recB.FromCache {
				t.Errorf("B did not build a damaged package itself (ran=%v, record %+v)", ran, recB)
			}
			if recB.Digest != recA.Digest {
				t.Errorf("B's digest %s, want %s", recB.Digest, recA.Digest)
			}
		})
	}

	t.Run("upload failure does not fail the build", func(t *testing.T) {
		c := newHost(t, unwritableDir(t))
		c.build(t, "pkg", deterministic(c, "pkg"))
		e := c.ev.wait(t, etcdstore.EventCacheUploadFailed, "pkg")
		t.Logf("upload failed as it should: %v", e.Err)
	})
}

func TestStoreRejectsMaliciousArchives(t *testing.T) {
	base := t.TempDir()
	rc, err := cache.NewDir(base, cache.WithLimits(cache.Limits{MaxBytes: 1 << 20, MaxEntries: 100, MaxWindow: cache.DefaultMaxWindow}))
	if err != nil {
		t.Fatal(err)
	}
	h := newHost(t, rc)
	big := make([]byte, 2<<20)
	for _, tc := range []struct {
		id      string
		entries []entry
	}{
		{"dotdot", []entry{{typ: tar.TypeReg, name: "../x", body: "evil"}}},
		{"abs", []entry{{typ: tar.TypeReg, name: "/tmp/granary-evil", body: "evil"}}},
		{"etclink", []entry{{typ: tar.TypeSymlink, name: "etc", linkname: "/etc"}, {typ: tar.TypeReg, name: "etc/granary-evil", body: "evil"}}},
		{"uplink", []entry{{typ: tar.TypeSymlink, name: "up", linkname: "../.."}, {typ: tar.TypeReg, name: "up/granary-evil", body: "evil"}}},
		{"oversize", []entry{{typ: tar.TypeReg, name: "big", body: string(big)}}},
	} {
		t.Run(tc.id, func(t *testing.T) {
			writeFile(t, filepath.Join(base, tc.id+".tar.zst"), string(rawArchive(t, tc.entries...)))
			idx := fmt.Sprintf(`{"id":%q,"format":%d,"digest":"sha256:%s"}`, tc.id, cache.FormatVersion, zeros)
			writeFile(t, filepath.Join(base, tc.id+".json"), idx)
			ran := false
			h.build(t, tc.id, func(ctx context.Context) error { ran = true; return deterministic(h, tc.id)(ctx) })
			if !ran || h.ev.seen(etcdstore.EventCacheHit, tc.id) {
				t.Errorf("a malicious archive was accepted (builder ran: %v)", ran)
			}
			// Nothing beside contents/ and logs/, nothing in the root's
			// other places, nothing in /etc or /tmp.
			ents, _ := os.ReadDir(filepath.Join(h.root, "pkgs", tc.id))
			if len(ents) != 2 {
				t.Errorf("pkgs/%s holds %v, want contents and logs", tc.id, ents)
			}
			for _, p := range []string{filepath.Join(h.root, "pkgs", "x"), filepath.Join(h.root, "granary-evil"),
				filepath.Join(h.root, "pkgs", "granary-evil"), "/etc/granary-evil", "/tmp/granary-evil"} {
				if _, err := os.Lstat(p); err == nil {
					os.Remove(p)
					t.Errorf("%s was written", p)
				}
			}
		})
	}
}

func TestStoreWithNginxCache(t *testing.T) {
	n := startNginx(t)
	rc := openHTTP(t, n.url+"/cache/farm/", cache.WithTempDir(t.TempDir()))
	a, b := newHost(t, rc), newHost(t, rc)
	recA := a.build(t, "tool", deterministic(a, "tool"))
	a.ev.wait(t, etcdstore.EventCacheStored, "tool")
	recB := b.build(t, "tool", mustNotRun(t))
	if !b.ev.seen(etcdstore.EventCacheHit, "tool") || recB.Digest != recA.Digest {
		t.Errorf("B: cache hit %v, digest %s; want a hit with digest %s", b.ev.seen(etcdstore.EventCacheHit, "tool"), recB.Digest, recA.Digest)
	}

	// nginx answers 405 to a PUT where WebDAV is off: the build still
	// succeeds and the failure is reported.
	ro := openHTTP(t, n.url+"/ro/", cache.WithTempDir(t.TempDir()))
	c := newHost(t, ro)
	c.build(t, "tool", deterministic(c, "tool"))
	e := c.ev.wait(t, etcdstore.EventCacheUploadFailed, "tool")
	if e.Err == nil || !contains(e.Err.Error(), "405") {
		t.Errorf("upload failure %v, want a 405", e.Err)
	}
}

func TestStoreHoldsReferenceWhileUploading(t *testing.T) {
	url, accepted := hangingServer(t, "")
	rc := openHTTP(t, url, cache.WithTimeout(2*time.Second), cache.WithRetries(0), cache.WithTempDir(t.TempDir()))
	h := newHost(t, rc)
	ctx := context.Background()
	h.build(t, "up", deterministic(h, "up"))
	select {
	case <-accepted: // the upload is under way (its reference is taken before it packs)
	case <-time.After(30 * time.Second):
		t.Fatal("the upload did not start within 30s")
	}
	if ok, err := h.store.Handle("up").TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("TryRemove during the upload = %v, %v; want false, nil (in use)", ok, err)
	}
	h.ev.wait(t, etcdstore.EventCacheUploadFailed, "up") // the server never answers
	if ok, err := h.store.Handle("up").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove after the upload = %v, %v; want true, nil", ok, err)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

package etcdstore_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/internal/netfstest"
)

func openStore(t *testing.T, srv *etcdtest.Server, root string, opts ...etcdstore.Option) (*etcdstore.Store, error) {
	t.Helper()
	cli := srv.Client(t)
	s, err := etcdstore.New(context.Background(), cli, root, append([]etcdstore.Option{etcdstore.WithTTL(testTTL)}, opts...)...)
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, err
}

// TestRootBindingBothWays: once a prefix has a shared root, an empty root
// (a host whose volume is not mounted) and a missing root are refused, and
// the missing one is not created; init-root is explicit, and afterwards the
// old root is the one refused.
func TestRootBindingBothWays(t *testing.T) {
	srv := etcdtest.Start(t)
	shared := t.TempDir()
	if s, err := openStore(t, srv, shared); err != nil {
		t.Fatalf("first root: %v", err)
	} else if s.CreatedRoot() {
		t.Errorf("the store says it created %s, which existed", shared)
	}
	fi, err := os.Stat(filepath.Join(shared, ".granary", "cluster"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("binding mode = %v, want 0644 (readable by every user of the root)", fi.Mode().Perm())
	}

	empty := t.TempDir()
	_, err = openStore(t, srv, empty)
	if !errors.Is(err, etcdstore.ErrNotSharedRoot) || !strings.Contains(err.Error(), "is the shared volume mounted?") {
		t.Fatalf("empty root on a bound prefix = %v, want ErrNotSharedRoot asking about the mount", err)
	}
	t.Logf("message: %v", err)
	if ents, _ := os.ReadDir(empty); len(ents) != 0 {
		t.Errorf("refused root was written to: %v", ents)
	}

	// On a local file system a missing root is missing: refused without
	// looking again (on a network file system it would be looked for up to
	// the visibility timeout, TestNetFSStaleRootEntry).
	missing := filepath.Join(t.TempDir(), "nfs", "granary")
	var waits atomic.Int32
	countWaits := etcdstore.WithEvents(func(ev etcdstore.Event) {
		if ev.Kind == etcdstore.EventWaitRoot {
			waits.Add(1)
		}
	})
	if _, err = openStore(t, srv, missing, countWaits); !errors.Is(err, etcdstore.ErrNotSharedRoot) {
		t.Fatalf("missing root on a bound prefix = %v, want ErrNotSharedRoot", err)
	}
	if n := waits.Load(); n != 0 {
		t.Errorf("a missing root on a local file system: %d wait-root events, want none", n)
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a refused missing root was created (stat: %v)", err)
	}

	// Another prefix is another store: its first root is accepted, and
	// made.
	if s, err := openStore(t, srv, missing, etcdstore.WithPrefix("/other/")); err != nil {
		t.Fatalf("first root of another prefix: %v", err)
	} else if !s.CreatedRoot() {
		t.Errorf("the first root of a prefix did not exist, but the store does not say it created it")
	}

	// Explicit init makes a new root the shared one; the old one is then
	// refused.
	if _, err := openStore(t, srv, empty, etcdstore.WithInitRoot(true)); err != nil {
		t.Fatalf("init-root: %v", err)
	}
	if _, err := openStore(t, srv, empty); err != nil {
		t.Fatalf("the new shared root after init: %v", err)
	}
	if _, err = openStore(t, srv, shared); !errors.Is(err, etcdstore.ErrNotSharedRoot) {
		t.Fatalf("the replaced root = %v, want ErrNotSharedRoot", err)
	}
}

// TestLegacyBindingAdopted: a root bound by an older Granary (no root ID,
// mode 0600) is accepted by every host with one derived identity.
func TestLegacyBindingAdopted(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	s, err := openStore(t, srv, root)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	// Rewrite it the old way, and forget the prefix's root in etcd.
	b, _ := os.ReadFile(filepath.Join(root, ".granary", "cluster"))
	old := strings.Replace(string(b), `"root_id"`, `"x_root_id"`, 1)
	if err := os.WriteFile(filepath.Join(root, ".granary", "cluster"), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	cli := srv.Client(t)
	if _, err := cli.Delete(context.Background(), etcdstore.DefaultPrefix+"root"); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := openStore(t, srv, root); err != nil {
			t.Fatalf("open %d of a legacy root: %v", i, err)
		}
	}
	if fi, err := os.Stat(filepath.Join(root, ".granary", "cluster")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("legacy binding not made readable by all: %v %v", fi.Mode(), err)
	}
	if _, err := openStore(t, srv, t.TempDir()); !errors.Is(err, etcdstore.ErrNotSharedRoot) {
		t.Fatalf("an empty root next to an adopted legacy root = %v, want ErrNotSharedRoot", err)
	}
}

// TestBindingWithoutHardLinks: on a network file system without link(2),
// three hosts open a fresh root at once; every one binds it, to one
// identity.
func TestBindingWithoutHardLinks(t *testing.T) {
	e := netfstest.Mount(t, netfstest.Config{Options: netfstest.NFSLike, NoHardLinks: true})
	srv := etcdtest.Start(t)
	var wg sync.WaitGroup
	errs := make([]error, len(e.Hosts))
	for i := range e.Hosts {
		wg.Go(func() {
			_, errs[i] = openStore(t, srv, e.Path(i, "root"))
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("host %d: %v", i, err)
		}
	}
	b, err := os.ReadFile(filepath.Join(e.Dir, "root", ".granary", "cluster"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("binding: %s", b)
}

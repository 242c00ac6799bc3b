package etcdstore_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/internal/netfstest"
)

// The tests in this file run the store on three independent sshfs mounts of
// one export (internal/netfstest), one store per mount, so each store sees
// the shared root through its own client cache, as hosts on NFS do.

// netHosts mounts one export three times with opts and opens one store per
// mount on one etcd, named hostA, hostB, hostC, binding the root from hostA
// first.
func netHosts(t *testing.T, opts string, extra ...etcdstore.Option) (*netfstest.Export, *etcdtest.Server, []*etcdstore.Store, *hostEvents) {
	t.Helper()
	e := netfstest.Mount(t, netfstest.Config{Options: opts})
	srv := etcdtest.Start(t)
	ev := &hostEvents{}
	var stores []*etcdstore.Store
	for i := range e.Hosts {
		host := "host" + string(rune('A'+i))
		o := append([]etcdstore.Option{etcdstore.WithHost(host), etcdstore.WithEvents(ev.hookFor(host))}, extra...)
		stores = append(stores, newStore(t, srv, e.Path(i, "root"), o...))
	}
	return e, srv, stores, ev
}

// hostEvents records events by host.
type hostEvents struct {
	mu  sync.Mutex
	evs []hostEvent
}

type hostEvent struct {
	host string
	ev   etcdstore.Event
}

func (l *hostEvents) hookFor(host string) func(etcdstore.Event) {
	return func(e etcdstore.Event) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.evs = append(l.evs, hostEvent{host, e})
	}
}

func (l *hostEvents) count(host string, k etcdstore.EventKind) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, e := range l.evs {
		if (host == "" || e.host == host) && e.ev.Kind == k {
			n++
		}
	}
	return n
}

func buildFiles(t *testing.T, s *etcdstore.Store, id string, files map[string]string) {
	t.Helper()
	h := s.Handle(id)
	err := h.Build(func() error {
		for name, data := range files {
			if err := os.WriteFile(filepath.Join(h.OutputDirectory(), name), []byte(data), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("build %s: %v", id, err)
	}
}

// record returns the published record of id, with its entry count filled
// in from the server's view if the publisher did not record one.
func record(t *testing.T, s *etcdstore.Store, e *netfstest.Export, id string) *etcdstore.PackageRecord {
	t.Helper()
	info, err := s.Inspect(context.Background(), id)
	if err != nil || info.Package == nil {
		t.Fatalf("inspect %s: %+v %v", id, info, err)
	}
	if info.Package.Entries == 0 {
		n, err := etcdstore.TopEntries(filepath.Join(e.Dir, "root", "pkgs", id, "contents"))
		if err != nil {
			t.Fatal(err)
		}
		info.Package.Entries = n
	}
	return info.Package
}

// TestNetFSNegativeEntryThenRun: host B looked the package up before it
// existed (a negative entry, trusted for 30 s like NFS's lookupcache=all),
// host A builds it. etcd tells B at once that it is available, and B's
// reference succeeds, but B cannot see the tree: that is the failure. The
// wait for visibility makes the reference usable, and a host that cannot
// wait that long gets ErrNotVisible naming the mount option.
func TestNetFSNegativeEntryThenRun(t *testing.T) {
	e, srv, st, ev := netHosts(t, netfstest.NFSLike)
	a, b := st[0], st[1]
	c := newStore(t, srv, e.Path(2, "root"), etcdstore.WithHost("hostC"), etcdstore.WithVisibleTimeout(time.Second))
	ctx := context.Background()
	for _, s := range []*etcdstore.Store{b, c} {
		if _, err := os.Stat(filepath.Join(s.Handle("p").OutputDirectory(), "f")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("before the build: %v", err)
		}
	}
	buildFiles(t, a, "p", map[string]string{"f": "v1", "g": "more"})
	rec := record(t, a, e, "p")

	hb := b.Handle("p")
	if err := hb.IncRef(); err != nil {
		t.Fatalf("B: IncRef of a published package: %v", err)
	}
	f := filepath.Join(hb.OutputDirectory(), "f")
	if _, err := os.ReadFile(f); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("B read the tree at once (err %v): the negative entry was not cached, so this test shows nothing", err)
	}

	// C cannot wait as long as its cache keeps the negative entry.
	err := etcdstore.AwaitVisible(ctx, c, "p", rec)
	if !errors.Is(err, etcdstore.ErrNotVisible) || !strings.Contains(err.Error(), "lookupcache=positive") {
		t.Fatalf("C, 1s timeout: %v, want ErrNotVisible naming lookupcache=positive", err)
	}
	t.Logf("C: %v", err)

	// B waits (up to the default 60 s) and then sees the whole tree.
	var verr error
	done := make(chan struct{})
	go func() { defer close(done); verr = b.Verify(ctx, "p") }()
	if err := etcdstore.AwaitVisible(ctx, b, "p", rec); err != nil {
		t.Fatalf("B: %v", err)
	}
	if got, err := os.ReadFile(f); err != nil || string(got) != "v1" {
		t.Fatalf("B after waiting: %q %v", got, err)
	}
	<-done
	if verr != nil {
		t.Fatalf("B: verify: %v", verr)
	}
	if n := ev.count("hostB", etcdstore.EventWaitVisible); n == 0 {
		t.Errorf("B waited without saying so (%d wait-visible events)", n)
	}
}

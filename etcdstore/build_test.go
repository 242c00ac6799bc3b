package etcdstore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// eventLog collects events and lets a test wait for one.
type eventLog struct {
	mu     sync.Mutex
	events []etcdstore.Event
	notify chan struct{}
}

func newEventLog() *eventLog { return &eventLog{notify: make(chan struct{}, 1)} }

func (l *eventLog) hook(e etcdstore.Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
	select {
	case l.notify <- struct{}{}:
	default:
	}
}

func (l *eventLog) count(k etcdstore.EventKind, id string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, e := range l.events {
		if e.Kind == k && e.ID == id {
			n++
		}
	}
	return n
}

// wait blocks until an event of kind k for id has been seen.
func (l *eventLog) wait(t *testing.T, k etcdstore.EventKind, id string) etcdstore.Event {
	t.Helper()
	ceiling := time.After(60 * time.Second)
	for {
		l.mu.Lock()
		for _, e := range l.events {
			if e.Kind == k && e.ID == id {
				l.mu.Unlock()
				return e
			}
		}
		l.mu.Unlock()
		select {
		case <-l.notify:
		case <-ceiling:
			t.Fatalf("no %v event for %q", k, id)
		}
	}
}

// TestWaitersShareFailure: hosts waiting on an attempt that fails get
// ErrBuildFailed naming the host and logs, and never run their builders;
// a later Build tries again.
func TestWaitersShareFailure(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	a := newStore(t, srv, root, etcdstore.WithHost("host-a"))
	evB, evC := newEventLog(), newEventLog()
	b := newStore(t, srv, root, etcdstore.WithHost("host-b"), etcdstore.WithEvents(evB.hook))
	c := newStore(t, srv, root, etcdstore.WithHost("host-c"), etcdstore.WithEvents(evC.hook))

	started, release := make(chan struct{}), make(chan struct{})
	boom := errors.New("compiler exploded")
	aErr := make(chan error, 1)
	go func() {
		aErr <- a.Handle("broken").Build(func() error {
			close(started)
			<-release
			return boom
		})
	}()
	<-started
	var waiterRan atomic.Int32
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		s := b
		if i%2 == 1 {
			s = c
		}
		wg.Go(func() {
			errs[i] = s.Handle("broken").Build(func() error { waiterRan.Add(1); return nil })
		})
	}
	e := evB.wait(t, etcdstore.EventWaiting, "broken")
	evC.wait(t, etcdstore.EventWaiting, "broken")
	if e.Host != "host-a" || e.LogDir == "" {
		t.Fatalf("waiting event = %+v, want it to name host-a and its logs", e)
	}
	close(release)
	wg.Wait()
	if err := <-aErr; !errors.Is(err, boom) || !errors.Is(err, core.ErrBuildFailed) {
		t.Fatalf("builder's Build = %v, want it to wrap the builder's error and ErrBuildFailed", err)
	}
	for i, err := range errs {
		var be *etcdstore.BuildError
		if !errors.Is(err, core.ErrBuildFailed) || !errors.As(err, &be) || be.Host != "host-a" {
			t.Errorf("waiter %d: Build = %v, want a BuildError naming host-a", i, err)
		}
	}
	if n := waiterRan.Load(); n != 0 {
		t.Fatalf("waiters ran their builders %d times after the failure, want 0", n)
	}
	// Later callers try again.
	var ran atomic.Int32
	if err := c.Handle("broken").Build(func() error { ran.Add(1); return nil }); err != nil || ran.Load() != 1 {
		t.Fatalf("Build after the failure = %v (ran %d), want nil and one run", err, ran.Load())
	}
}

// TestLeaseLostNeverPublishes: a builder whose lease is revoked while it is
// blocked (a frozen host whose lease expired) cannot publish; another store
// takes over, and the takeover's tree stays intact.
func TestLeaseLostNeverPublishes(t *testing.T) {
	for _, how := range []string{"client closed", "lease revoked"} {
		t.Run(how, func(t *testing.T) {
			srv := etcdtest.Start(t)
			root := t.TempDir()
			zcli := srv.Client(t)
			evZ := newEventLog()
			zombie, err := etcdstore.New(context.Background(), zcli, root, etcdstore.WithTTL(testTTL), etcdstore.WithHost("zombie"), etcdstore.WithEvents(evZ.hook))
			if err != nil {
				t.Fatal(err)
			}
			defer zombie.Close()
			ev := newEventLog()
			other := newStore(t, srv, root, etcdstore.WithHost("other"), etcdstore.WithEvents(ev.hook))

			started, release := make(chan struct{}), make(chan struct{})
			zErr := make(chan error, 1)
			zh := zombie.Handle("contested")
			go func() {
				zErr <- zh.Build(func() error {
					os.WriteFile(filepath.Join(zh.OutputDirectory(), "zombie-partial"), []byte("x"), 0o644)
					close(started)
					<-release // frozen: ignores everything until released
					return nil
				})
			}()
			<-started
			switch how {
			case "client closed":
				zcli.Close()
			case "lease revoked":
				if _, err := other.Client().Revoke(context.Background(), zombie.Lease()); err != nil {
					t.Fatal(err)
				}
			}
			// Another host takes over once the zombie's lease is gone.
			oh := other.Handle("contested")
			if err := oh.Build(func() error {
				return os.WriteFile(filepath.Join(oh.OutputDirectory(), "data"), []byte("takeover"), 0o644)
			}); err != nil {
				t.Fatalf("takeover Build = %v", err)
			}
			if ev.count(etcdstore.EventLockDelay, "contested") != 1 {
				t.Errorf("takeover did not wait the lock delay before moving the dead attempt's tree")
			}
			close(release) // the zombie wakes up and claims success
			err = <-zErr
			if err == nil {
				t.Fatal("zombie Build = nil, want an error: it lost its lease")
			}
			t.Logf("zombie Build: %v", err)
			if !errors.Is(err, etcdstore.ErrLeaseLost) && !errors.Is(err, etcdstore.ErrFenced) {
				t.Errorf("zombie Build error says neither lost lease nor fencing: %v", err)
			}
			info, ierr := other.Inspect(context.Background(), "contested")
			if ierr != nil || info.Package == nil || info.Package.BuiltBy != "other" {
				t.Fatalf("published package = %+v, %v; want the takeover's", info.Package, ierr)
			}
			if err := other.Verify(context.Background(), "contested"); err != nil {
				t.Fatalf("takeover tree changed: %v", err)
			}
			if _, err := os.Stat(filepath.Join(oh.OutputDirectory(), "zombie-partial")); err == nil {
				t.Fatal("the dead attempt's partial file is in the published tree")
			}
		})
	}
}

// TestBuildCancelled: a Build whose callers all give up stops its builder
// and leaves the package buildable at once by anyone.
func TestBuildCancelled(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	a, b := newStore(t, srv, root), newStore(t, srv, root)
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- a.Handle("cancelled").BuildContext(ctx, func(bctx context.Context) error {
			close(started)
			<-bctx.Done()
			return bctx.Err()
		})
	}()
	<-started
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Build = %v, want context.Canceled", err)
	}
	var ran atomic.Int32
	if err := b.Handle("cancelled").Build(func() error { ran.Add(1); return nil }); err != nil || ran.Load() != 1 {
		t.Fatalf("Build after a cancelled attempt = %v (ran %d), want nil, 1", err, ran.Load())
	}
}

// TestInvalidIDCreatesNothing: invalid IDs touch nothing outside (or inside)
// the root.
func TestInvalidIDCreatesNothing(t *testing.T) {
	srv := etcdtest.Start(t)
	parent := t.TempDir()
	root := filepath.Join(parent, "root")
	s := newStore(t, srv, root)
	for _, id := range []string{"../outside", "..", "a/../../b", "/abs", "x\x00y"} {
		h := s.Handle(id)
		ran := false
		if err := h.Build(func() error { ran = true; return nil }); !errors.Is(err, core.ErrInvalidID) || ran {
			t.Fatalf("Build(%q) = %v (ran %v), want ErrInvalidID and no run", id, err, ran)
		}
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 1 || ents[0].Name() != "root" {
		t.Fatalf("parent of root holds %v, want only root", ents)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "pkgs")); len(ents) != 0 {
		t.Fatalf("pkgs holds %v, want nothing", ents)
	}
}

// TestEtcdUnreachable: with etcd gone, every operation fails inside its
// deadline with an error, and nothing hangs.
func TestEtcdUnreachable(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(testTTL), etcdstore.WithOpTimeout(500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	build(t, s, "present")
	srv.Stop()
	h := s.Handle("present")
	if err := h.IncRef(); err == nil {
		t.Error("IncRef with etcd down = nil")
	}
	if ok, err := h.TryRemove(); ok || err == nil {
		t.Errorf("TryRemove with etcd down = %v, %v; want false, error", ok, err)
	}
	ran := false
	if err := s.Handle("absent").Build(func() error { ran = true; return nil }); err == nil || ran {
		t.Errorf("Build with etcd down = %v (ran %v), want error, no run", err, ran)
	}
	if _, err := s.Prune(context.Background(), etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1}); err == nil {
		t.Error("Prune with etcd down = nil")
	}
	if err := s.Close(); err == nil {
		t.Error("Close with etcd down = nil, want an error saying the lease was not revoked")
	}
	// Nothing on disk changed.
	if _, err := os.Stat(filepath.Join(h.OutputDirectory(), "data")); err != nil {
		t.Errorf("published tree damaged: %v", err)
	}

	// New against an endpoint where nothing listens fails by deadline too.
	dead := etcdtest.ClientConfig("unix://" + filepath.Join(t.TempDir(), "nothing.sock"))
	dcli, err := clientv3New(dead)
	if err != nil {
		t.Fatal(err)
	}
	defer dcli.Close()
	_, err = etcdstore.New(context.Background(), dcli, t.TempDir(), etcdstore.WithOpTimeout(300*time.Millisecond))
	if err == nil || !contains(err.Error(), "cannot reach etcd") {
		t.Fatalf("New against nothing = %v, want 'cannot reach etcd'", err)
	}
}

func TestForeignClusterRefused(t *testing.T) {
	root := t.TempDir()
	newStore(t, etcdtest.Start(t), root)
	other := etcdtest.Start(t)
	cli := other.Client(t)
	_, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(testTTL))
	if !errors.Is(err, etcdstore.ErrForeignCluster) {
		t.Fatalf("New on a root bound to another cluster = %v, want ErrForeignCluster", err)
	}
	t.Logf("message: %v", err)
	cli2 := other.Client(t)
	_, err = etcdstore.New(context.Background(), cli2, root, etcdstore.WithPrefix("/other/"))
	if !errors.Is(err, etcdstore.ErrForeignCluster) {
		t.Fatalf("New with another prefix = %v, want ErrForeignCluster", err)
	}
}

// TestBuilderStoppedByLeaseLoss: a builder that honours its cancellation
// fails with its own error ("signal: killed"), and Build says why it was
// stopped.
func TestBuilderStoppedByLeaseLoss(t *testing.T) {
	srv := etcdtest.Start(t)
	s := newStore(t, srv, t.TempDir(), etcdstore.WithHost("victim"))
	h := s.Handle("stopped")
	started := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- h.BuildContext(context.Background(), func(ctx context.Context) error {
			close(started)
			<-ctx.Done()
			return errors.New("sh: signal: killed")
		})
	}()
	<-started
	if _, err := srv.Client(t).Revoke(context.Background(), s.Lease()); err != nil {
		t.Fatal(err)
	}
	err := <-errc
	if !errors.Is(err, etcdstore.ErrLeaseLost) || !strings.Contains(err.Error(), "signal: killed") {
		t.Fatalf("Build = %v; want the builder's error and the lost lease", err)
	}
	t.Log(err)
}

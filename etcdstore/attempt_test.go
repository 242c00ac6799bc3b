package etcdstore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// TestCloseDuringUploadRef: Close landing while a build's upload takes its
// reference used to deadlock (storeCache held Store.mu and released the
// reference, which locked Store.mu again; Close waited forever).
func TestCloseDuringUploadRef(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	defer cli.Close()
	c := &refCheckCache{refs: make(chan int, 1)}
	s, err := etcdstore.New(context.Background(), cli, t.TempDir(), etcdstore.WithTTL(testTTL), etcdstore.WithCache(c))
	if err != nil {
		t.Fatal(err)
	}
	c.obs = s
	closed := make(chan error, 1)
	etcdstore.SetTestHookUpload(s, func(string) {
		go func() { closed <- s.Close() }()
		for !etcdstore.Closed(s) {
			time.Sleep(time.Millisecond)
		}
	})
	built := make(chan error, 1)
	go func() { built <- s.Handle("p").Build(func() error { return nil }) }()
	select {
	case err := <-built:
		if err != nil {
			t.Fatalf("Build = %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Build did not return: Close during the upload's reference deadlocked")
	}
	if err := <-closed; err != nil {
		t.Fatalf("Close = %v", err)
	}
}

// TestCleanFailureSkipsLockDelay: after a builder fails cleanly (its attempt
// released the lock in the Txn that recorded the failure and moved its
// output aside), the next attempt, on another store, starts at once
// without the lock delay meant for attempts that died. An attempt that
// died and left its output still costs the delay.
func TestCleanFailureSkipsLockDelay(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	a := newStore(t, srv, root, etcdstore.WithHost("a"))
	ev := newEventLog()
	b := newStore(t, srv, root, etcdstore.WithHost("b"), etcdstore.WithEvents(ev.hook), etcdstore.WithLockDelay(time.Hour))

	h := a.Handle("fails-once")
	err := h.Build(func() error {
		os.WriteFile(filepath.Join(h.OutputDirectory(), "partial"), []byte("x"), 0o644)
		os.WriteFile(filepath.Join(h.LoggingDirectory(), "build-1.log"), []byte("boom\n"), 0o644)
		return errors.New("exit status 42")
	})
	if err == nil {
		t.Fatal("first Build succeeded")
	}
	a.Close() // as `granary build` does: the failure record goes with the lease
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := b.Handle("fails-once").BuildOutcome(ctx, func(context.Context) error { return nil })
	if err != nil {
		t.Fatalf("second Build = %v (a lock delay of an hour would time out here)", err)
	}
	if out.How != etcdstore.Built {
		t.Errorf("outcome = %v, want built", out.How)
	}
	if n := ev.count(etcdstore.EventLockDelay, "fails-once"); n != 0 {
		t.Errorf("%d lock-delay events after a clean failure, want 0", n)
	}
	if _, err := os.Stat(filepath.Join(b.Handle("fails-once").LoggingDirectory(), "build-1.log")); err != nil {
		t.Errorf("log of the failed attempt: %v, want it kept", err)
	}

	// Leftovers of an attempt that did not end cleanly: an output
	// directory with no record in etcd.
	c := newStore(t, srv, root, etcdstore.WithHost("c"), etcdstore.WithEvents(ev.hook), etcdstore.WithLockDelay(10*time.Millisecond))
	left := c.Handle("left-over")
	if err := os.MkdirAll(filepath.Join(left.OutputDirectory(), "junk"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := left.Build(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if n := ev.count(etcdstore.EventLockDelay, "left-over"); n != 1 {
		t.Errorf("%d lock-delay events for an unfinished attempt's leftovers, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(left.OutputDirectory(), "junk")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover junk in the new tree: stat = %v", err)
	}
}

// TestBuildOutcome: each way of coming by a package says so.
func TestBuildOutcome(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	a := newStore(t, srv, root, etcdstore.WithHost("a"))
	b := newStore(t, srv, root, etcdstore.WithHost("b"))
	ctx := context.Background()
	queued := make(chan struct{})
	etcdstore.SetTestHookWait(b, func(string) { close(queued) })

	started, release := make(chan struct{}), make(chan struct{})
	built := make(chan etcdstore.Outcome, 1)
	go func() {
		out, err := a.Handle("p").BuildOutcome(ctx, func(context.Context) error {
			close(started)
			<-release
			return nil
		})
		if err != nil {
			t.Errorf("Build on a = %v", err)
		}
		built <- out
	}()
	<-started
	waited := make(chan etcdstore.Outcome, 1)
	go func() {
		out, err := b.Handle("p").BuildOutcome(ctx, func(context.Context) error {
			t.Error("builder ran on b")
			return nil
		})
		if err != nil {
			t.Errorf("Build on b = %v", err)
		}
		waited <- out
	}()
	<-queued
	close(release)
	if out := <-built; out.How != etcdstore.Built || out.Package == nil || out.Package.BuiltBy != "a" {
		t.Errorf("a: outcome %+v, want built by a", out)
	}
	if out := <-waited; out.How != etcdstore.Waited || out.Package == nil || out.Package.BuiltBy != "a" {
		t.Errorf("b: outcome %+v, want waited for a", out)
	}
	out, err := b.Handle("p").BuildOutcome(ctx, func(context.Context) error { return nil })
	if err != nil || out.How != etcdstore.AlreadyAvailable || out.Package.Digest == "" {
		t.Errorf("third Build = %+v, %v; want already available with the record", out, err)
	}
}

// TestIncRefDuringFailedBuild: IncRef that waited for a build which then
// failed reports the package missing; one whose context ends while it
// waits returns at once with the context's error.
func TestIncRefDuringFailedBuild(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	a := newStore(t, srv, root, etcdstore.WithHost("a"))
	ev := newEventLog()
	b := newStore(t, srv, root, etcdstore.WithHost("b"), etcdstore.WithEvents(ev.hook))

	started, release := make(chan struct{}), make(chan struct{})
	built := make(chan error, 1)
	go func() {
		built <- a.Handle("p").Build(func() error {
			close(started)
			<-release
			return errors.New("boom")
		})
	}()
	<-started

	ctx, cancel := context.WithCancel(context.Background())
	cancelled := make(chan error, 1)
	go func() { cancelled <- b.Handle("p").IncRefContext(ctx) }()
	ev.wait(t, etcdstore.EventWaiting, "p")
	cancel()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("IncRef whose context ended while waiting = %v, want context.Canceled", err)
	}

	waited := make(chan error, 1)
	go func() { waited <- b.Handle("p").IncRef() }()
	for ev.count(etcdstore.EventWaiting, "p") < 2 {
		ev.wait(t, etcdstore.EventWaiting, "p")
		time.Sleep(time.Millisecond)
	}
	close(release)
	if err := <-built; err == nil {
		t.Fatal("Build succeeded")
	}
	if err := <-waited; !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("IncRef that waited for a failed build = %v, want ErrPackageNotExist", err)
	}
}

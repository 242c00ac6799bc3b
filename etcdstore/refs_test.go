package etcdstore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

func build(t *testing.T, s *etcdstore.Store, id string) {
	t.Helper()
	h := s.Handle(id)
	err := h.Build(func() error {
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "data"), []byte("complete"), 0o644)
	})
	if err != nil {
		t.Fatalf("Build(%q) = %v", id, err)
	}
}

// waitGone blocks until no key is left under prefix, watching from a read,
// with a generous ceiling so a broken expiry fails instead of hanging.
func waitGone(t *testing.T, cli *clientv3.Client, prefix string, ceiling time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ceiling)
	defer cancel()
	for {
		resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatalf("waiting for %s to empty: %v", prefix, err)
		}
		if resp.Count == 0 {
			return
		}
		wch := cli.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1), clientv3.WithFilterPut())
		select {
		case <-wch:
		case <-ctx.Done():
			t.Fatalf("keys under %s still there after %v", prefix, ceiling)
		}
	}
}

func TestRefsExpireWhenHolderDies(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	holderCli := srv.Client(t)
	holder, err := etcdstore.New(context.Background(), holderCli, root, etcdstore.WithTTL(testTTL))
	if err != nil {
		t.Fatal(err)
	}
	other := newStore(t, srv, root)
	build(t, other, "expiring")
	if err := holder.Handle("expiring").IncRef(); err != nil {
		t.Fatal(err)
	}
	// The holder's host dies: its client goes away without a word.
	holderCli.Close()
	if ok, err := other.Handle("expiring").TryRemove(); ok || err != nil {
		t.Fatalf("TryRemove right after the holder died = %v, %v; want false, nil (ref lives until the TTL)", ok, err)
	}
	waitGone(t, other.Client(), other.Prefix()+"ref/expiring/", 10*testTTL)
	if ok, err := other.Handle("expiring").TryRemove(); !ok || err != nil {
		t.Fatalf("TryRemove after the TTL = %v, %v; want true, nil", ok, err)
	}
	holder.Close() // its lease is gone already; the error says so
}

func TestRefsDropAtClose(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	holder, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(60*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	other := newStore(t, srv, root)
	build(t, other, "closing")
	for range 3 {
		if err := holder.Handle("closing").IncRef(); err != nil {
			t.Fatal(err)
		}
	}
	if ok, _ := other.Handle("closing").TryRemove(); ok {
		t.Fatal("TryRemove succeeded while referenced")
	}
	if err := holder.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	// No waiting: Close revoked the 60 s lease.
	if ok, err := other.Handle("closing").TryRemove(); !ok || err != nil {
		t.Fatalf("TryRemove right after Close = %v, %v; want true, nil", ok, err)
	}
	if err := holder.Handle("closing").IncRef(); !errors.Is(err, etcdstore.ErrClosed) {
		t.Fatalf("IncRef on a closed store = %v, want ErrClosed", err)
	}
}

func TestInspectShowsRefs(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	s := newStore(t, srv, root, etcdstore.WithHost("host-a"), etcdstore.WithPurpose("make test"))
	build(t, s, "inspected")
	h := s.Handle("inspected")
	if err := h.IncRef(); err != nil {
		t.Fatal(err)
	}
	info, err := s.Inspect(context.Background(), "inspected")
	if err != nil {
		t.Fatal(err)
	}
	if info.State != etcdstore.StateAvailable || info.Package == nil || info.Package.BuiltBy != "host-a" {
		t.Fatalf("Inspect = %+v, want available, built by host-a", info)
	}
	if len(info.Refs) != 1 || info.Refs[0].Host != "host-a" || info.Refs[0].PID != os.Getpid() || info.Refs[0].Purpose != "make test" {
		t.Fatalf("Inspect refs = %+v, want one ref by host-a, this pid, purpose 'make test'", info.Refs)
	}
	if info.Package.Size != int64(len("complete")) || info.Package.Digest == "" || info.ATime.IsZero() {
		t.Fatalf("Inspect package = %+v, want size 8, a digest and an atime", info.Package)
	}
	if err := s.Verify(context.Background(), "inspected"); err != nil {
		t.Fatalf("Verify = %v", err)
	}
	// Published trees are read-only (as far as permissions go: root ignores them).
	fi, err := os.Stat(filepath.Join(h.OutputDirectory(), "data"))
	if err != nil || fi.Mode().Perm()&0o222 != 0 {
		t.Fatalf("published file mode = %v, %v; want no write bits", fi.Mode(), err)
	}
	// A change after publishing is detected.
	os.Chmod(filepath.Join(h.OutputDirectory(), "data"), 0o644)
	os.WriteFile(filepath.Join(h.OutputDirectory(), "data"), []byte("tampered"), 0o644)
	if err := s.Verify(context.Background(), "inspected"); !errors.Is(err, etcdstore.ErrDigestMismatch) {
		t.Fatalf("Verify after tampering = %v, want ErrDigestMismatch", err)
	}
	list, err := s.List(context.Background())
	if err != nil || len(list) != 1 || list[0].ID != "inspected" || list[0].Refs != 1 {
		t.Fatalf("List = %+v, %v; want one package with one ref", list, err)
	}
	if _, err := s.Inspect(context.Background(), "../x"); !errors.Is(err, core.ErrInvalidID) {
		t.Fatalf("Inspect(invalid) = %v, want ErrInvalidID", err)
	}
}

// TestIncRefRacesTryRemove: IncRef on one store and TryRemove on another,
// started together, round after round. Never may both succeed, and an
// IncRef that succeeds must see the complete tree. It runs at least
// minRounds and goes on until both orders have happened (at most
// maxRounds), and fails if one of them never did: a race test that only
// ever sees one winner has not tested the race.
func TestIncRefRacesTryRemove(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	stores := []*etcdstore.Store{newStore(t, srv, root), newStore(t, srv, root), newStore(t, srv, root)}
	minRounds, maxRounds := 200, 600
	if testing.Short() {
		minRounds = 30
	}
	var refWins, removeWins, rounds int
	for i := 0; i < maxRounds && (i < minRounds || refWins == 0 || removeWins == 0); i++ {
		rounds++
		builder, reffer, remover := stores[i%3], stores[(i+1)%3], stores[(i+2)%3]
		build(t, builder, "raced")
		var wg sync.WaitGroup
		var incErr, remErr error
		var removed, complete bool
		start := make(chan struct{})
		// TryRemove takes its lock before it removes, so an IncRef started
		// at the same instant nearly always wins. Staggering IncRef by 0 to
		// 2.7 ms across rounds lets both orders (and the close calls in
		// between) occur.
		stagger := time.Duration(i%10) * 300 * time.Microsecond
		wg.Go(func() {
			<-start
			time.Sleep(stagger)
			h := reffer.Handle("raced")
			incErr = h.IncRef()
			if incErr == nil {
				b, err := os.ReadFile(filepath.Join(h.OutputDirectory(), "data"))
				complete = err == nil && string(b) == "complete"
			}
		})
		wg.Go(func() {
			<-start
			removed, remErr = remover.Handle("raced").TryRemove()
		})
		close(start)
		wg.Wait()
		if remErr != nil {
			t.Fatalf("round %d: TryRemove = %v", i, remErr)
		}
		if incErr != nil && !errors.Is(incErr, core.ErrPackageNotExist) {
			t.Fatalf("round %d: IncRef = %v", i, incErr)
		}
		if incErr == nil && removed {
			t.Fatalf("round %d: IncRef and TryRemove both succeeded", i)
		}
		if incErr == nil && !complete {
			t.Fatalf("round %d: IncRef succeeded on an incomplete tree", i)
		}
		if incErr == nil {
			refWins++
			if err := reffer.Handle("raced").DecRef(); err != nil {
				t.Fatal(err)
			}
			if ok, err := remover.Handle("raced").TryRemove(); !ok || err != nil {
				t.Fatalf("round %d: TryRemove after DecRef = %v, %v", i, ok, err)
			}
		} else {
			removeWins++
		}
	}
	t.Logf("%d rounds: IncRef first %d, TryRemove first %d", rounds, refWins, removeWins)
	if refWins == 0 || removeWins == 0 {
		t.Errorf("in %d rounds IncRef won %d times and TryRemove %d: both orders must happen for the race to be tested (change the stagger)",
			rounds, refWins, removeWins)
	}
}

// TestIncRefAfterRepublish: a store that took a reference remembers the
// published record and, from then on, takes references with a compare on
// its mod revision instead of reading it back. After another store
// removes the package and publishes a different tree under the same ID,
// IncRef must notice the new publish, take the reference and check the
// new tree's visibility (its entry count differs from the old one's), and
// a removed package must still be reported as not existing.
func TestIncRefAfterRepublish(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	a := newStore(t, srv, root, etcdstore.WithVisibleTimeout(time.Second))
	b := newStore(t, srv, root)
	build(t, a, "p")
	for range 2 { // the second one relies on the remembered record
		if err := a.Handle("p").IncRef(); err != nil {
			t.Fatalf("IncRef = %v", err)
		}
		if err := a.Handle("p").DecRef(); err != nil {
			t.Fatalf("DecRef = %v", err)
		}
	}
	if ok, err := b.Handle("p").TryRemove(); !ok || err != nil {
		t.Fatalf("TryRemove = %v, %v, want true, nil", ok, err)
	}
	if err := a.Handle("p").IncRef(); !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("IncRef of a removed package = %v, want ErrPackageNotExist", err)
	}
	hb := b.Handle("p")
	if err := hb.Build(func() error {
		for _, f := range []string{"one", "two", "three"} {
			if err := os.WriteFile(filepath.Join(hb.OutputDirectory(), f), nil, 0o644); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("rebuild = %v", err)
	}
	if err := a.Handle("p").IncRef(); err != nil {
		t.Fatalf("IncRef of the package published again = %v", err)
	}
	if got := a.HeldRefs("p"); got != 1 {
		t.Errorf("HeldRefs = %d, want 1", got)
	}
	if ok, _ := b.Handle("p").TryRemove(); ok {
		t.Errorf("TryRemove while a holds the new publish removed it")
	}
	if err := a.Handle("p").DecRef(); err != nil {
		t.Fatalf("DecRef = %v", err)
	}
}

package etcdstore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

type slowCache struct{ started, release chan struct{} }

func (c *slowCache) Fetch(ctx context.Context, id, dir string) (bool, error) {
	os.WriteFile(filepath.Join(dir, "zombie-partial"), []byte("x"), 0o644)
	close(c.started)
	<-c.release // a long download / retries against a slow cache
	return false, errors.New("cache unreachable after retries")
}
func (c *slowCache) Store(context.Context, string, string, etcdstore.PackageRecord) error { return nil }

// TestCacheFetchStopsWithLease: a cache fetch that outlives its store's
// lease (a slow or retrying cache) leaves the tree alone afterwards: the
// host that took over after the lock delay builds in that directory.
func TestCacheFetchStopsWithLease(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	zcli := srv.Client(t)
	sc := &slowCache{started: make(chan struct{}), release: make(chan struct{})}
	lost := make(chan struct{})
	var once sync.Once
	events := etcdstore.WithEvents(func(e etcdstore.Event) {
		if e.Kind == etcdstore.EventLeaseLost {
			once.Do(func() { close(lost) })
		}
	})
	zombie, err := etcdstore.New(context.Background(), zcli, root, etcdstore.WithTTL(testTTL), etcdstore.WithHost("zombie"), etcdstore.WithCache(sc), events)
	if err != nil {
		t.Fatal(err)
	}
	defer zombie.Close()
	other := newStore(t, srv, root, etcdstore.WithHost("other"))
	zErr := make(chan error, 1)
	go func() { zErr <- zombie.Handle("contested").Build(func() error { return nil }) }()
	<-sc.started
	if _, err := other.Client().Revoke(context.Background(), zombie.Lease()); err != nil {
		t.Fatal(err)
	}
	oh := other.Handle("contested")
	building, zombieDone := make(chan struct{}), make(chan struct{})
	oErr := make(chan error, 1)
	go func() {
		oErr <- oh.Build(func() error {
			os.WriteFile(filepath.Join(oh.OutputDirectory(), "early"), []byte("1"), 0o644)
			close(building)
			<-zombieDone
			return os.WriteFile(filepath.Join(oh.OutputDirectory(), "late"), []byte("2"), 0o644)
		})
	}()
	<-building
	<-lost // the fetch returns after its store learnt of the loss
	close(sc.release)
	if err := <-zErr; !errors.Is(err, etcdstore.ErrLeaseLost) && !errors.Is(err, etcdstore.ErrFenced) {
		t.Errorf("zombie Build = %v; want a lost lease", err)
	}
	close(zombieDone)
	if err := <-oErr; err != nil {
		t.Fatalf("takeover: %v", err)
	}
	ents, _ := os.ReadDir(oh.OutputDirectory())
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if len(names) != 2 || names[0] != "early" || names[1] != "late" {
		t.Errorf("published tree %v, want [early late]: the zombie's failed fetch moved the takeover's tree to the trash", names)
	}
}

type refCheckCache struct {
	obs  *etcdstore.Store
	refs chan int
}

func (c *refCheckCache) Fetch(context.Context, string, string) (bool, error) { return false, nil }
func (c *refCheckCache) Store(ctx context.Context, id, dir string, rec etcdstore.PackageRecord) error {
	info, err := c.obs.Inspect(context.Background(), id)
	if err != nil {
		return err
	}
	c.refs <- len(info.Refs)
	return nil
}

// TestUploadHoldsRefWhenClosedAtOnce: the upload after a build holds a
// reference even when the store is closed right after Build, as `granary
// build` does.
func TestUploadHoldsRefWhenClosedAtOnce(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	obs := newStore(t, srv, root, etcdstore.WithHost("obs"))
	held := 0
	const n = 10
	for i := range n {
		c := &refCheckCache{obs: obs, refs: make(chan int, 1)}
		cli := srv.Client(t)
		s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(testTTL), etcdstore.WithCache(c))
		if err != nil {
			t.Fatal(err)
		}
		id := "pkg" + string(rune('a'+i))
		if err := s.Handle(id).Build(func() error { return nil }); err != nil {
			t.Fatal(err)
		}
		s.Close() // what `granary build` does right after Build
		cli.Close()
		if <-c.refs > 0 {
			held++
		}
	}
	if held < n {
		t.Errorf("only %d of %d uploads held a reference when the store was closed right after Build", held, n)
	}
}

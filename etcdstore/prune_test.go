package etcdstore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

func buildSized(t *testing.T, s *etcdstore.Store, id string, size int) {
	t.Helper()
	h := s.Handle(id)
	if err := h.Build(func() error {
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "blob"), []byte(strings.Repeat("x", size)), 0o644)
	}); err != nil {
		t.Fatal(err)
	}
}

func ids(ps []etcdstore.PrunedPackage) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.ID)
	}
	slices.Sort(out)
	return out
}

func available(t *testing.T, s *etcdstore.Store) []string {
	t.Helper()
	list, err := s.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range list {
		if p.State == etcdstore.StateAvailable {
			out = append(out, p.ID)
		}
	}
	return out
}

func TestPrune(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name       string
		opts       etcdstore.PruneOptions
		wantGone   []string
		wantInUse  []string
		wantRemain []string
	}{
		{"grace protects fresh packages", etcdstore.PruneOptions{OlderThan: time.Nanosecond}, nil, nil, []string{"a", "b", "c", "held"}},
		{"age removes all but the held", etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1}, []string{"a", "b", "c"}, []string{"held"}, []string{"held"}},
		{"dry run changes nothing", etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1, DryRun: true}, []string{"a", "b", "c"}, []string{"held"}, []string{"a", "b", "c", "held"}},
		{"size target removes oldest first", etcdstore.PruneOptions{TargetBytes: 250, Grace: -1}, []string{"a", "b"}, nil, []string{"c", "held"}},
		{"max removals caps the sweep", etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1, MaxRemovals: 1}, []string{"a"}, nil, []string{"b", "c", "held"}},
		{"nothing selected without a target", etcdstore.PruneOptions{Grace: -1}, nil, nil, []string{"a", "b", "c", "held"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := etcdtest.Start(t)
			s := newStore(t, srv, t.TempDir())
			// 100 bytes each. By last use: a, b, c, then held (IncRef touches it).
			for _, id := range []string{"a", "held", "b", "c"} {
				buildSized(t, s, id, 100)
			}
			if err := s.Handle("held").IncRef(); err != nil {
				t.Fatal(err)
			}
			rep, err := s.Prune(ctx, tt.opts)
			if err != nil {
				t.Fatalf("Prune = %v", err)
			}
			if got := ids(rep.Removed); !slices.Equal(got, tt.wantGone) {
				t.Errorf("removed %v, want %v", got, tt.wantGone)
			}
			if !slices.Equal(rep.InUse, tt.wantInUse) && !(len(rep.InUse) == 0 && tt.wantInUse == nil) {
				t.Errorf("in use %v, want %v", rep.InUse, tt.wantInUse)
			}
			if got := available(t, s); !slices.Equal(got, tt.wantRemain) {
				t.Errorf("available after prune %v, want %v", got, tt.wantRemain)
			}
			if rep.Packages != 4 || rep.TotalBytes != 400 {
				t.Errorf("report counted %d packages, %d bytes; want 4, 400", rep.Packages, rep.TotalBytes)
			}
			for _, id := range tt.wantGone {
				_, err := os.Stat(s.Handle(id).OutputDirectory())
				if gone := errors.Is(err, os.ErrNotExist); gone == tt.opts.DryRun {
					t.Errorf("%s: tree gone = %v in a dry run = %v", id, gone, tt.opts.DryRun)
				}
			}
		})
	}
}

func TestPruneOrphansAndTrash(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	s := newStore(t, srv, root)
	old := time.Now().Add(-time.Hour)
	orphan := filepath.Join(root, "pkgs", "orphan")
	os.MkdirAll(filepath.Join(orphan, "contents"), 0o755)
	os.Chtimes(orphan, old, old)
	fresh := filepath.Join(root, "pkgs", "fresh-orphan")
	os.MkdirAll(fresh, 0o755)
	junk := filepath.Join(root, ".trash", "junk")
	os.MkdirAll(junk, 0o500)
	os.Chtimes(junk, old, old)

	rep, err := s.Prune(context.Background(), etcdstore.PruneOptions{Grace: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Orphans, []string{"orphan"}) {
		t.Fatalf("orphans %v, want [orphan] (fresh-orphan is within the grace period)", rep.Orphans)
	}
	if _, err := os.Stat(orphan); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("orphan still in pkgs: %v", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Fatalf("fresh orphan was swept: %v", err)
	}
	if _, err := os.Stat(junk); !errors.Is(err, os.ErrNotExist) || rep.TrashEntries != 1 {
		t.Fatalf("old trash entry: stat %v, report %d; want deleted, 1", err, rep.TrashEntries)
	}
}

// TestConcurrentCollectors: collectors on several stores at once never
// remove a package twice; at most one sweeps at a time.
func TestConcurrentCollectors(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	stores := []*etcdstore.Store{newStore(t, srv, root), newStore(t, srv, root), newStore(t, srv, root)}
	const n = 20
	for i := range n {
		build(t, stores[0], "pkg-"+string(rune('a'+i)))
	}
	var mu sync.Mutex
	removed := map[string]int{}
	var busy int
	var wg sync.WaitGroup
	for _, s := range stores {
		wg.Go(func() {
			rep, err := s.Prune(context.Background(), etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1})
			mu.Lock()
			defer mu.Unlock()
			if errors.Is(err, etcdstore.ErrCollectorBusy) {
				busy++
				return
			}
			if err != nil {
				t.Errorf("Prune = %v", err)
			}
			for _, p := range rep.Removed {
				removed[p.ID]++
			}
		})
	}
	wg.Wait()
	if len(removed) != n {
		t.Errorf("removed %d distinct packages, want %d", len(removed), n)
	}
	for id, c := range removed {
		if c != 1 {
			t.Errorf("%s reported removed %d times", id, c)
		}
	}
	t.Logf("collectors that found another one busy: %d", busy)
}

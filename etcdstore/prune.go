package etcdstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/granary-build/granary/core"
)

// DefaultPruneGrace is the grace period Prune uses when PruneOptions.Grace
// is zero.
const DefaultPruneGrace = 10 * time.Minute

// PruneOptions says what Prune may remove. A package is a candidate when it
// is older than OlderThan (by last access), or while the store is above
// TargetBytes; candidates go oldest first. Nothing used or published within
// the grace period, and nothing referenced, is ever removed.
type PruneOptions struct {
	OlderThan   time.Duration // 0: age alone selects nothing
	TargetBytes int64         // 0: no size target
	MaxRemovals int           // 0: no cap
	// Grace protects recent packages and recent orphan directories; zero
	// means DefaultPruneGrace, negative means none.
	Grace  time.Duration
	DryRun bool // report what would be removed; change nothing
}

// PrunedPackage is one package Prune removed (or would remove).
type PrunedPackage struct {
	ID    string    `json:"id"`
	Size  int64     `json:"size"`
	ATime time.Time `json:"atime"`
}

// PruneReport says what a sweep did.
type PruneReport struct {
	DryRun       bool            `json:"dry_run"`
	Packages     int             `json:"packages"`      // available when the sweep started
	TotalBytes   int64           `json:"total_bytes"`   // their size
	Removed      []PrunedPackage `json:"removed"`       // removed (or, in a dry run, would be)
	FreedBytes   int64           `json:"freed_bytes"`   // their size
	InUse        []string        `json:"in_use"`        // candidates kept: referenced, building or touched
	Orphans      []string        `json:"orphans"`       // directories without a package, moved to trash
	TrashEntries int             `json:"trash_entries"` // old trash entries deleted
	// TrashPending counts files kept in the trash because a process on
	// some host may still have them open (.nfs*, .fuse_hidden*, younger
	// than SillyMaxAge); their entries stay until they are closed.
	TrashPending int `json:"trash_pending"`
	// TrashErrors lists every failure to delete from the trash (at most
	// ten per entry); the next sweep tries again.
	TrashErrors []string `json:"trash_errors,omitempty"`
}

// Prune removes packages as opts says, oldest access first, each with
// TryRemove's guarantees plus one more: a package touched since the sweep
// listed it is kept. It also moves orphan directories (a tree with no
// package, older than the grace period) to the trash and deletes old trash.
// One collector runs at a time across the cluster; a second concurrent
// Prune returns ErrCollectorBusy.
func (s *Store) Prune(ctx context.Context, opts PruneOptions) (PruneReport, error) {
	rep := PruneReport{DryRun: opts.DryRun, Removed: []PrunedPackage{}, InUse: []string{}, Orphans: []string{}}
	grace := opts.Grace
	if grace == 0 {
		grace = DefaultPruneGrace
	} else if grace < 0 {
		grace = 0
	}
	ls, err := s.sess.Current(ctx)
	if err != nil {
		return rep, fmt.Errorf("etcdstore: prune: %w", err)
	}
	gc := s.newLock(ls, s.opt.prefix+"gc/")
	ok, err := gc.tryLock(ctx)
	if err != nil {
		return rep, fmt.Errorf("etcdstore: prune: %w", err)
	}
	if !ok {
		return rep, ErrCollectorBusy
	}
	defer gc.release()

	avail, known, err := s.pruneCandidates(ctx)
	if err != nil {
		return rep, fmt.Errorf("etcdstore: prune: %w", err)
	}
	now := time.Now()
	for _, p := range avail {
		rep.TotalBytes += p.size
	}
	rep.Packages = len(avail)
	slices.SortStableFunc(avail, func(a, b candidate) int { return cmp.Compare(a.lastUse, b.lastUse) })

	remaining := rep.TotalBytes
	for _, p := range avail {
		if opts.MaxRemovals > 0 && len(rep.Removed) >= opts.MaxRemovals {
			break
		}
		last := time.Unix(0, p.lastUse)
		age := now.Sub(last)
		old := opts.OlderThan > 0 && age > opts.OlderThan
		big := opts.TargetBytes > 0 && remaining > opts.TargetBytes
		if (!old && !big) || age < grace {
			continue
		}
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		pp := PrunedPackage{ID: p.id, Size: p.size, ATime: last}
		if opts.DryRun {
			if p.refs > 0 || p.busy {
				rep.InUse = append(rep.InUse, p.id)
				continue
			}
			rep.Removed = append(rep.Removed, pp)
			rep.FreedBytes += pp.Size
			remaining -= pp.Size
			continue
		}
		removed, err := s.tryRemove(ctx, p.id, p.atimeRev, false)
		switch {
		case err != nil && !errors.Is(err, core.ErrPackageNotExist):
			return rep, fmt.Errorf("etcdstore: prune %q: %w", p.id, err)
		case removed:
			rep.Removed = append(rep.Removed, pp)
			rep.FreedBytes += pp.Size
			remaining -= pp.Size
		case err == nil:
			rep.InUse = append(rep.InUse, p.id)
		}
	}
	if err := s.sweepDirs(ctx, known, grace, &rep); err != nil {
		return rep, fmt.Errorf("etcdstore: prune: %w", err)
	}
	return rep, nil
}

// sweepDirs moves orphan package directories to the trash and deletes old
// trash entries.
func (s *Store) sweepDirs(ctx context.Context, known map[string]bool, grace time.Duration, rep *PruneReport) error {
	entries, err := os.ReadDir(s.pkgsDir())
	if err != nil {
		return err
	}
	for _, e := range entries {
		id := e.Name()
		if known[id] || !old(e, grace) {
			continue
		}
		ok, err := s.sweepOrphan(ctx, id, rep.DryRun)
		if err != nil {
			return err
		}
		if ok {
			rep.Orphans = append(rep.Orphans, id)
		}
	}
	if rep.DryRun {
		return nil
	}
	trash, err := os.ReadDir(s.trashDir())
	if err != nil {
		return err
	}
	for _, e := range trash {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !old(e, grace) {
			continue
		}
		path := s.trashDir() + "/" + e.Name()
		r := s.deleteTrash(ctx, path)
		s.reportTrash(path, r)
		if r.Deleted {
			rep.TrashEntries++
		}
		rep.TrashPending += r.Pending
		for _, err := range r.Errs {
			rep.TrashErrors = append(rep.TrashErrors, err.Error())
		}
	}
	return nil
}

func old(e os.DirEntry, grace time.Duration) bool {
	info, err := e.Info()
	return err == nil && time.Since(info.ModTime()) >= grace
}

func sortSummaries(xs []Summary) {
	slices.SortFunc(xs, func(a, b Summary) int { return strings.Compare(a.ID, b.ID) })
}

// candidate is what Prune keeps of one available package: a few words, so
// a sweep over 100k packages stays small (List keeps whole records).
type candidate struct {
	id       string
	lastUse  int64 // unix nanoseconds: the later of access and publish
	size     int64
	atimeRev int64
	refs     int32
	busy     bool // a build record exists (an attempt or a failure)
}

// pruneCandidates reads the available packages page by page, with their
// last use, references and build records, and the set of every ID etcd
// knows (available, building or failed), for the orphan sweep.
func (s *Store) pruneCandidates(ctx context.Context) ([]candidate, map[string]bool, error) {
	var cands []candidate
	index := map[string]int{}
	known := map[string]bool{}
	err := s.scanPackages(ctx, packageVisitor{
		avail: func(id string, p *PackageRecord) {
			known[id] = true
			index[id] = len(cands)
			cands = append(cands, candidate{id: id, lastUse: p.BuiltAt.UnixNano(), size: p.Size})
		},
		buildKeysOnly: true,
		build: func(id string, _ *BuildRecord) {
			known[id] = true
			if i, ok := index[id]; ok {
				cands[i].busy = true
			}
		},
		atime: func(id string, at time.Time, modRev int64) {
			if i, ok := index[id]; ok {
				if !at.IsZero() && at.UnixNano() > cands[i].lastUse {
					cands[i].lastUse = at.UnixNano()
				}
				cands[i].atimeRev = modRev
			}
		},
		ref: func(id string) {
			if i, ok := index[id]; ok {
				cands[i].refs++
			}
		},
	})
	if err == nil {
		// A remembered failure keeps its package directory (its logs)
		// from the orphan sweep for as long as the record lives.
		err = s.scan(ctx, "failed/", true, func(id string, _ *mvccpb.KeyValue) error {
			known[id] = true
			return nil
		})
	}
	return cands, known, err
}

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
	"github.com/granary-build/granary/internal/keys"
)

// DefaultPruneGrace is the grace period Prune uses when PruneOptions.Grace
// is zero.
const DefaultPruneGrace = 10 * time.Minute

// PruneOptions says what Prune may remove. A package is a candidate when it
// is older than OlderThan (by last access), or while the store is above
// TargetBytes; candidates go oldest first. Nothing used or published within
// the grace period, and nothing referenced, is ever removed.
//
// The zero value of each field means "not set"; a real zero is asked for
// with a negative value (see AnyAge, EmptyStore, NoGrace), so that a
// caller's "0" given on purpose never turns into a default.
type PruneOptions struct {
	// OlderThan selects packages unused for longer than this. 0: age alone
	// selects nothing; negative (AnyAge): every package is old enough.
	OlderThan time.Duration
	// TargetBytes selects packages, oldest first, while the store is
	// larger. 0: no size target; negative (EmptyStore): a target of zero
	// bytes.
	TargetBytes int64
	MaxRemovals int // 0: no cap
	// Grace protects recent packages and recent orphan directories; zero
	// means DefaultPruneGrace, negative (NoGrace) means none.
	Grace  time.Duration
	DryRun bool // report what would be removed; change nothing
}

// The real zeros of PruneOptions' fields, whose zero values mean "not set".
const (
	AnyAge     time.Duration = -1 // OlderThan: any age, however recent
	EmptyStore int64         = -1 // TargetBytes: zero bytes
	NoGrace    time.Duration = -1 // Grace: none
)

// Reasons a candidate package was kept (KeptPackage.Reason).
const (
	KeptGrace     = "grace"     // used or published within the grace period
	KeptHeld      = "held"      // a job (a plain reference) holds it
	KeptLingering = "lingering" // only nodes' cached references keep it
	KeptBuilding  = "building"  // an attempt holds its lock
	KeptTouched   = "touched"   // used since the sweep listed it
)

// KeptPackage is a candidate Prune did not remove, and why.
type KeptPackage struct {
	ID     string    `json:"id"`
	Size   int64     `json:"size"`
	ATime  time.Time `json:"atime"`
	Reason string    `json:"reason"` // one of the Kept* constants
	// Refs are the references that kept it (KeptHeld, KeptLingering).
	Refs []RefInfo `json:"refs,omitempty"`
}

// PrunedPackage is one package Prune removed (or would remove).
type PrunedPackage struct {
	ID    string    `json:"id"`
	Size  int64     `json:"size"`
	ATime time.Time `json:"atime"`
}

// PruneReport says what a sweep did.
type PruneReport struct {
	DryRun     bool            `json:"dry_run"`
	Packages   int             `json:"packages"`    // available when the sweep started
	TotalBytes int64           `json:"total_bytes"` // their size
	Removed    []PrunedPackage `json:"removed"`     // removed (or, in a dry run, would be)
	FreedBytes int64           `json:"freed_bytes"` // their size
	InUse      []string        `json:"in_use"`      // candidates kept: referenced, building or touched
	// Kept lists every candidate not removed, with its reason: InUse's
	// packages and those within the grace period.
	Kept         []KeptPackage `json:"kept"`
	Orphans      []string      `json:"orphans"`       // directories without a package, moved to trash
	TrashEntries int           `json:"trash_entries"` // old trash entries deleted
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
	rep := PruneReport{DryRun: opts.DryRun, Removed: []PrunedPackage{}, InUse: []string{}, Kept: []KeptPackage{}, Orphans: []string{}}
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
	gc := s.newLock(ls, s.keys.GCPrefix())
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
		old := opts.OlderThan < 0 || (opts.OlderThan > 0 && age > opts.OlderThan)
		big := opts.TargetBytes != 0 && remaining > max(opts.TargetBytes, 0)
		if !old && !big {
			continue
		}
		pp := PrunedPackage{ID: p.id, Size: p.size, ATime: last}
		if age < grace {
			rep.Kept = append(rep.Kept, KeptPackage{ID: p.id, Size: p.size, ATime: last, Reason: KeptGrace})
			continue
		}
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		if opts.DryRun {
			if p.refs > 0 || p.busy {
				if err := s.keep(ctx, &rep, pp); err != nil {
					return rep, err
				}
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
			if err := s.keep(ctx, &rep, pp); err != nil {
				return rep, err
			}
		}
	}
	if err := s.sweepDirs(ctx, known, grace, &rep); err != nil {
		return rep, fmt.Errorf("etcdstore: prune: %w", err)
	}
	return rep, nil
}

// keep adds a candidate that is in use to rep.InUse and rep.Kept, with the
// reason read back from etcd: a plain reference (a job), only cached
// references (nodes lingering), a build record, or else a use since the
// sweep listed it.
func (s *Store) keep(ctx context.Context, rep *PruneReport, p PrunedPackage) error {
	rep.InUse = append(rep.InUse, p.ID)
	info, err := s.Inspect(ctx, p.ID)
	if err != nil {
		return fmt.Errorf("etcdstore: prune %q: %w", p.ID, err)
	}
	k := KeptPackage{ID: p.ID, Size: p.Size, ATime: p.ATime, Reason: KeptTouched}
	var held, cached []RefInfo
	for _, r := range info.Refs {
		if r.Cached {
			cached = append(cached, r)
		} else {
			held = append(held, r)
		}
	}
	switch {
	case len(held) > 0:
		k.Reason, k.Refs = KeptHeld, held
	case len(cached) > 0:
		k.Reason, k.Refs = KeptLingering, cached
	case info.Build != nil && info.Build.State == BuildRunning:
		k.Reason = KeptBuilding
	}
	rep.Kept = append(rep.Kept, k)
	return nil
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
		err = s.scan(ctx, keys.Failed, true, func(id string, _ *mvccpb.KeyValue) error {
			known[id] = true
			return nil
		})
	}
	return cands, known, err
}

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
	KeptPinned    = "pinned"    // pinned (Pin)
	KeptNeeded    = "needed"    // published packages that remain need it
)

// KeptPackage is a candidate Prune did not remove, and why.
type KeptPackage struct {
	ID     string    `json:"id"`
	Size   int64     `json:"size"`
	ATime  time.Time `json:"atime"`
	Reason string    `json:"reason"` // one of the Kept* constants
	// Refs are the references that kept it (KeptHeld, KeptLingering).
	Refs []RefInfo `json:"refs,omitempty"`
	// Pin kept it (KeptPinned); NeededBy, the packages that need it
	// (KeptNeeded).
	Pin      *PinRecord `json:"pin,omitempty"`
	NeededBy []string   `json:"needed_by,omitempty"`
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
// listed it is kept. An invalidated package is always a candidate, whatever
// its age and the grace period. A package kept only because a candidate
// needs it is tried again once that candidate is removed, so an unused
// dependent and then its unused needs go in one sweep. It also moves
// orphan directories (a tree with no package, older than the grace period)
// to the trash and deletes old trash. One collector runs at a time across
// the cluster; a second concurrent Prune returns ErrCollectorBusy.
func (s *Store) Prune(ctx context.Context, opts PruneOptions) (PruneReport, error) {
	rep := PruneReport{DryRun: opts.DryRun, Removed: []PrunedPackage{}, InUse: []string{}, Kept: []KeptPackage{}, Orphans: []string{}}
	ls, err := s.sess.Current(ctx)
	if err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	gc := s.newLock(ls, s.keys.GCPrefix())
	ok, err := gc.tryLock(ctx)
	if err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	if !ok {
		return rep, ErrCollectorBusy
	}
	defer gc.release()

	avail, known, err := s.pruneCandidates(ctx)
	if err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	sw := &sweep{s: s, opts: opts, rep: &rep, now: time.Now(), grace: opts.Grace, index: map[string]*candidate{}, deferred: map[string]*candidate{}}
	if sw.grace == 0 {
		sw.grace = DefaultPruneGrace
	} else if sw.grace < 0 {
		sw.grace = 0
	}
	slices.SortStableFunc(avail, func(a, b candidate) int { return cmp.Compare(a.lastUse, b.lastUse) })
	for i := range avail {
		rep.TotalBytes += avail[i].size
		sw.index[avail[i].id] = &avail[i]
	}
	rep.Packages = len(avail)
	sw.remaining = rep.TotalBytes
	if err := sw.run(ctx, avail); err != nil {
		return rep, err
	}
	if err := s.sweepDirs(ctx, known, sw.grace, &rep); err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	return rep, nil
}

// sweep is one Prune's pass over its candidates.
type sweep struct {
	s         *Store
	opts      PruneOptions
	rep       *PruneReport
	now       time.Time
	grace     time.Duration
	remaining int64                 // bytes left in the store
	index     map[string]*candidate // every available package
	// deferred are candidates kept only because packages that need them
	// exist; each is tried again when the last of those is removed.
	deferred map[string]*candidate
}

// run goes over avail oldest first, then over the needs its removals freed.
func (sw *sweep) run(ctx context.Context, avail []candidate) error {
	queue := make([]*candidate, len(avail))
	for i := range avail {
		queue[i] = sw.index[avail[i].id]
	}
	for len(queue) > 0 {
		if sw.opts.MaxRemovals > 0 && len(sw.rep.Removed) >= sw.opts.MaxRemovals {
			break
		}
		p := queue[0]
		queue = queue[1:]
		freed, err := sw.one(ctx, p)
		if err != nil {
			return err
		}
		queue = append(freed, queue...) // its needs next: the cascade
	}
	for _, p := range sw.deferred { // never freed: kept because needed
		if err := sw.s.keep(ctx, sw.rep, p.pruned()); err != nil {
			return err
		}
	}
	return nil
}

// one decides candidate p and returns the deferred needs its removal freed.
func (sw *sweep) one(ctx context.Context, p *candidate) ([]*candidate, error) {
	age := sw.now.Sub(time.Unix(0, p.lastUse))
	old := p.invalid || sw.opts.OlderThan < 0 || (sw.opts.OlderThan > 0 && age > sw.opts.OlderThan)
	big := sw.opts.TargetBytes != 0 && sw.remaining > max(sw.opts.TargetBytes, 0)
	if !old && !big {
		return nil, nil
	}
	pp := p.pruned()
	if age < sw.grace && !p.invalid {
		sw.rep.Kept = append(sw.rep.Kept, KeptPackage{ID: pp.ID, Size: pp.Size, ATime: pp.ATime, Reason: KeptGrace})
		return nil, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if p.neededBy > 0 && p.refs == 0 && !p.busy && !p.pinned {
		// Needed by a package the listing saw: not worth a removal
		// attempt now; tried again if that dependent goes in this sweep.
		sw.deferred[p.id] = p
		return nil, nil
	}
	var removed bool
	if sw.opts.DryRun {
		removed = p.refs == 0 && !p.busy && !p.pinned
	} else {
		var err error
		removed, err = sw.s.tryRemove(ctx, p.id, p.atimeRev, false)
		if err != nil && !errors.Is(err, core.ErrPackageNotExist) {
			return nil, fmt.Errorf("prune %q: %w", p.id, err)
		}
		if err != nil {
			return nil, nil // gone meanwhile
		}
	}
	if !removed {
		return nil, sw.s.keep(ctx, sw.rep, pp)
	}
	sw.rep.Removed = append(sw.rep.Removed, pp)
	sw.rep.FreedBytes += pp.Size
	sw.remaining -= pp.Size
	return sw.free(p), nil
}

// free counts p's removal against its needs and returns those deferred that
// nothing needs any more.
func (sw *sweep) free(p *candidate) []*candidate {
	var freed []*candidate
	for _, n := range p.needs {
		c := sw.index[n]
		if c == nil {
			continue
		}
		c.neededBy--
		if d := sw.deferred[n]; d != nil && c.neededBy <= 0 {
			delete(sw.deferred, n)
			freed = append(freed, d)
		}
	}
	return freed
}

// keep adds a candidate that is in use to rep.InUse and rep.Kept, with the
// reason read back from etcd: a plain reference (a job), only cached
// references (nodes lingering), a build record, a pin, a dependent, or
// else a use since the sweep listed it.
func (s *Store) keep(ctx context.Context, rep *PruneReport, p PrunedPackage) error {
	rep.InUse = append(rep.InUse, p.ID)
	info, err := s.Inspect(ctx, p.ID)
	if err != nil {
		return fmt.Errorf("prune %q: %w", p.ID, err)
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
	case info.Pin != nil:
		k.Reason, k.Pin = KeptPinned, info.Pin
	case len(info.NeededBy) > 0:
		k.Reason, k.NeededBy = KeptNeeded, info.NeededBy
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
	neededBy int32
	pinned   bool
	invalid  bool
	needs    []string
}

func (c *candidate) pruned() PrunedPackage {
	return PrunedPackage{ID: c.id, Size: c.size, ATime: time.Unix(0, c.lastUse)}
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
			cands = append(cands, candidate{id: id, lastUse: p.BuiltAt.UnixNano(), size: p.Size, needs: p.Needs})
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
		neededBy: func(id string) {
			if i, ok := index[id]; ok {
				cands[i].neededBy++
			}
		},
		pin: func(id string, p *PinRecord) {
			if i, ok := index[id]; ok {
				cands[i].pinned = !p.Expired(time.Now())
			}
		},
		invalid: func(id string, _ *InvalidRecord) {
			if i, ok := index[id]; ok {
				cands[i].invalid = true
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

package etcdstore

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/keys"
)

// State of a package.
type State string

// Package states.
const (
	StateAvailable State = "available" // published
	StateBuilding  State = "building"  // an attempt holds the lock
	StateFailed    State = "failed"    // the last attempt failed; its builder is still alive
	StateAbsent    State = "absent"    // none of the above
)

// Info describes one package.
type Info struct {
	ID        string         `json:"id"`
	State     State          `json:"state"`
	OutputDir string         `json:"output_dir"`
	LogDir    string         `json:"log_dir"`
	Package   *PackageRecord `json:"package,omitempty"` // when available
	Build     *BuildRecord   `json:"build,omitempty"`   // attempt in progress or last failure
	Refs      []RefInfo      `json:"refs"`
	ATime     time.Time      `json:"atime,omitzero"`
	// NeededBy lists the published packages that need this one (its needs
	// are Package.Needs).
	NeededBy []string   `json:"needed_by"`
	Pin      *PinRecord `json:"pin,omitempty"`
	// Invalid is the invalidation in force; Invalidated, that of an
	// invalidated publish already removed (kept for the failure
	// retention).
	Invalid     *InvalidRecord `json:"invalid,omitempty"`
	Invalidated *InvalidRecord `json:"invalidated,omitempty"`
}

// RefInfo is one reference to a package.
type RefInfo struct {
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Since   time.Time `json:"since"`
	Purpose string    `json:"purpose,omitempty"`
	Lease   string    `json:"lease"`
	// Cached: a node's host reference for its local jobs
	// (IncRefCachedContext); it stays while the node lingers after the
	// last one, and a removal asks the node to let it go.
	Cached bool `json:"cached,omitempty"`
	// Holders is how many jobs on the node's host held the package through
	// a cached reference at HoldersAt (zero time: never asked; see
	// AskHolders).
	Holders   int       `json:"holders,omitempty"`
	HoldersAt time.Time `json:"holders_at,omitzero"`
	// Pods are the Kubernetes pods ("namespace/name") whose volumes the
	// node publishes from this reference.
	Pods []string `json:"pods,omitempty"`
}

// Inspect describes package id from one consistent read.
func (s *Store) Inspect(ctx context.Context, id string) (Info, error) {
	if err := core.ValidateID(id); err != nil {
		return Info{}, fmt.Errorf("inspect: %w", err)
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(cctx).Then(
		clientv3.OpGet(s.keys.AvailKey(id)),
		clientv3.OpGet(s.keys.BuildKey(id)),
		clientv3.OpGet(s.keys.ATimeKey(id)),
		clientv3.OpGet(s.keys.RefPrefix(id), clientv3.WithPrefix()),
		clientv3.OpGet(s.keys.NeededBy(id), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(s.keys.PinKey(id)),
		clientv3.OpGet(s.keys.InvalidKey(id)),
		clientv3.OpGet(s.keys.InvalidatedKey(id)),
	).Commit()
	if err != nil {
		return Info{}, fmt.Errorf("inspect %q: %w", id, err)
	}
	info := Info{ID: id, State: StateAbsent, OutputDir: s.outputDir(id), LogDir: s.logDir(id), Refs: []RefInfo{}, NeededBy: []string{}}
	r := func(i int) []*mvccpb.KeyValue { return resp.Responses[i].GetResponseRange().Kvs }
	if kvs := r(0); len(kvs) > 0 {
		if info.Package, err = decode[PackageRecord](kvs[0].Value); err != nil {
			return Info{}, err
		}
		info.State = StateAvailable
	}
	if kvs := r(1); len(kvs) > 0 {
		if info.Build, err = decode[BuildRecord](kvs[0].Value); err != nil {
			return Info{}, err
		}
		if info.State == StateAbsent {
			info.State = StateBuilding
			if info.Build.State == BuildFailed {
				info.State = StateFailed
			}
		}
	}
	if kvs := r(2); len(kvs) > 0 {
		info.ATime = parseNanos(kvs[0].Value)
	}
	for _, kv := range r(3) {
		info.Refs = append(info.Refs, s.refInfo(id, kv))
	}
	for _, kv := range r(4) {
		info.NeededBy = append(info.NeededBy, s.keys.Parse(string(kv.Key)).Rest)
	}
	for i, dst := range []any{&info.Pin, &info.Invalid, &info.Invalidated} {
		if kvs := r(5 + i); len(kvs) > 0 {
			if err := json.Unmarshal(kvs[0].Value, dst); err != nil {
				return Info{}, fmt.Errorf("inspect %q: %w", id, err)
			}
		}
	}
	return info, nil
}

func (s *Store) refInfo(id string, kv *mvccpb.KeyValue) RefInfo {
	rest := strings.TrimPrefix(string(kv.Key), s.keys.RefPrefix(id))
	lease, _, _ := strings.Cut(rest, "/")
	ri := RefInfo{Lease: lease}
	if rec, err := decode[refRecord](kv.Value); err == nil {
		ri.Host, ri.PID, ri.Since, ri.Purpose, ri.Cached, ri.Holders, ri.HoldersAt, ri.Pods = rec.Host, rec.PID, rec.Since, rec.Purpose, rec.Cached, rec.Holders, rec.HoldersAt, rec.Pods
	}
	return ri
}

// Summary is one line of List.
type Summary struct {
	ID       string         `json:"id"`
	State    State          `json:"state"`
	Package  *PackageRecord `json:"package,omitempty"`
	Build    *BuildRecord   `json:"build,omitempty"`
	Refs     int            `json:"refs"`
	ATime    time.Time      `json:"atime,omitzero"`
	NeededBy int            `json:"needed_by,omitempty"` // published packages that need it
	Pin      *PinRecord     `json:"pin,omitempty"`
	Invalid  *InvalidRecord `json:"invalid,omitempty"`
	atimeRev int64
}

// List returns every package that is available, building or failed,
// sorted by ID. It reads page by page, so memory grows with the number of
// packages, not with one huge response.
func (s *Store) List(ctx context.Context) ([]Summary, error) {
	byID := map[string]*Summary{}
	get := func(id string) *Summary {
		if x := byID[id]; x != nil {
			return x
		}
		x := &Summary{ID: id, State: StateAbsent}
		byID[id] = x
		return x
	}
	err := s.scanPackages(ctx, packageVisitor{
		avail: func(id string, p *PackageRecord) {
			x := get(id)
			x.Package, x.State = p, StateAvailable
		},
		build: func(id string, b *BuildRecord) {
			x := get(id)
			x.Build = b
			if x.State == StateAbsent {
				x.State = StateBuilding
				if b.State == BuildFailed {
					x.State = StateFailed
				}
			}
		},
		atime: func(id string, at time.Time, rev int64) {
			if x := byID[id]; x != nil {
				x.ATime, x.atimeRev = at, rev
			}
		},
		ref: func(id string) {
			if x := byID[id]; x != nil {
				x.Refs++
			}
		},
		neededBy: func(id string) {
			if x := byID[id]; x != nil {
				x.NeededBy++
			}
		},
		pin: func(id string, p *PinRecord) {
			if x := byID[id]; x != nil {
				x.Pin = p
			}
		},
		invalid: func(id string, r *InvalidRecord) {
			if x := byID[id]; x != nil {
				x.Invalid = r
			}
		},
	})
	if err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	out := make([]Summary, 0, len(byID))
	for _, x := range byID {
		out = append(out, *x)
	}
	sortSummaries(out)
	return out, nil
}

// packageVisitor receives what scanPackages reads. build gets nil records
// when only its keys are wanted (buildKeysOnly).
type packageVisitor struct {
	avail         func(id string, p *PackageRecord)
	build         func(id string, b *BuildRecord)
	buildKeysOnly bool
	atime         func(id string, at time.Time, modRev int64)
	ref           func(id string)
	neededBy      func(id string) // once per published dependent
	pin           func(id string, p *PinRecord)
	invalid       func(id string, r *InvalidRecord)
}

// scanPackages reads every package key a page at a time, kind by kind:
// available records, build records, access times, references, need
// edges, pins and invalidations (a visitor's nil function skips its kind).
func (s *Store) scanPackages(ctx context.Context, v packageVisitor) error {
	err := s.scan(ctx, keys.Avail, false, func(id string, k *mvccpb.KeyValue) error {
		p, err := decode[PackageRecord](k.Value)
		if err == nil {
			v.avail(id, p)
		}
		return err
	})
	if err == nil {
		err = s.scan(ctx, keys.Build, v.buildKeysOnly, func(id string, k *mvccpb.KeyValue) error {
			if v.buildKeysOnly {
				v.build(id, nil)
				return nil
			}
			b, err := decode[BuildRecord](k.Value)
			if err == nil {
				v.build(id, b)
			}
			return err
		})
	}
	if err == nil {
		err = s.scan(ctx, keys.ATime, false, func(id string, k *mvccpb.KeyValue) error {
			v.atime(id, parseNanos(k.Value), k.ModRevision)
			return nil
		})
	}
	if err == nil {
		err = s.scan(ctx, keys.Ref, true, func(rest string, _ *mvccpb.KeyValue) error {
			id, _, _ := strings.Cut(rest, "/")
			v.ref(id)
			return nil
		})
	}
	if err == nil && v.neededBy != nil {
		err = s.scan(ctx, keys.Need, true, func(rest string, _ *mvccpb.KeyValue) error {
			id, _, _ := strings.Cut(rest, "/")
			v.neededBy(id)
			return nil
		})
	}
	if err == nil && v.pin != nil {
		err = s.scan(ctx, keys.Pin, false, func(id string, k *mvccpb.KeyValue) error {
			if p, derr := decode[PinRecord](k.Value); derr == nil {
				v.pin(id, p)
			}
			return nil
		})
	}
	if err == nil && v.invalid != nil {
		err = s.scan(ctx, keys.Invalid, false, func(id string, k *mvccpb.KeyValue) error {
			if r, derr := decode[InvalidRecord](k.Value); derr == nil {
				v.invalid(id, r)
			}
			return nil
		})
	}
	return err
}

const pageSize = 1000

// scan calls fn for every key of kind (a keys constant), a page at a time,
// with the key's remainder after P/<kind>/.
func (s *Store) scan(ctx context.Context, kind string, keysOnly bool, fn func(rest string, k *mvccpb.KeyValue) error) error {
	pfx := s.keys.Kind(kind)
	end := clientv3.GetPrefixRangeEnd(pfx)
	from := pfx
	var rev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(pageSize)}
		if keysOnly {
			opts = append(opts, clientv3.WithKeysOnly())
		}
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev)) // one consistent snapshot
		}
		cctx, cancel := s.opCtx(ctx)
		resp, err := s.cli.Get(cctx, from, opts...)
		cancel()
		if err != nil {
			return err
		}
		rev = resp.Header.Revision
		for _, k := range resp.Kvs {
			if err := fn(strings.TrimPrefix(string(k.Key), pfx), k); err != nil {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// Verify recomputes the digest of a published package and compares it with
// the one recorded at publish. It first waits, like IncRef, until this host
// can see the tree (ErrNotVisible if it cannot within the visibility
// timeout). A walk that does not match is not trusted alone: this host's
// cache of the shared root may be stale, so Verify revalidates and walks
// again, and reports a mismatch only if the second walk does not match
// either, saying whether the two walks differed. It returns an error
// wrapping ErrDigestMismatch if the tree changed, core.ErrPackageNotExist if
// the package is not available.
func (s *Store) Verify(ctx context.Context, id string) error {
	info, err := s.Inspect(ctx, id)
	if err != nil {
		return err
	}
	if info.Package == nil {
		return fmt.Errorf("verify %q: %w", id, core.ErrPackageNotExist)
	}
	if err := s.awaitVisible(ctx, id, info.Package); err != nil {
		return fmt.Errorf("verify %q: %w", id, err)
	}
	want := info.Package.Digest
	first, _, err1 := TreeDigest(info.OutputDir)
	if err1 == nil && first == want {
		return nil
	}
	// Look again from the server's side of every directory of the tree.
	revalidateTree(s.pkgsDir(), s.pkgDir(id), info.OutputDir)
	second, _, err2 := TreeDigest(info.OutputDir)
	switch {
	case err2 == nil && second == want:
		s.opt.logger.Warn("verify: the first walk did not match but a second, after revalidation, did: this host's cache of the shared root was stale",
			"id", id, "first", first, "first_err", err1)
		return nil
	case err2 != nil:
		return fmt.Errorf("verify %q: %w", id, err2)
	case err1 == nil && first != second:
		return fmt.Errorf("%w: %q: recorded %s, two walks of the tree differed (%s, then %s after revalidation): "+
			"this host's view of the tree is changing (a stale cache of the shared root, or something writing to it)",
			ErrDigestMismatch, id, want, first, second)
	}
	return fmt.Errorf("%w: %q: recorded %s, tree has %s (the same in two walks, the second after revalidation)", ErrDigestMismatch, id, want, second)
}

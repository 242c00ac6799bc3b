package soak

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/internal/paths"
)

// refKeys is where etcd holds references: P/ref/<id>/<lease-hex>/<n>
// (docs/design.md, "Keys"). The soak reads the keys themselves, not the
// store's List, which counts only the references of packages it lists: a
// reference to a package that is gone is exactly what must not exist.
func refKeys() string { return etcdstore.DefaultPrefix + "ref/" }

// leftRef is a reference still in etcd after the soak.
type leftRef struct {
	id   string
	ref  etcdstore.RefInfo
	ttl  int64  // its lease's remaining TTL, s (-1: the lease is gone)
	node string // whose it is: a running node, a killed one, another process
}

func (l leftRef) String() string {
	return fmt.Sprintf("%s: host %s pid %d (%s) since %s, purpose %q, cached %v, holders %d, lease %s (TTL left %d s)",
		l.id, l.ref.Host, l.ref.PID, l.node, l.ref.Since.Format(time.StampMilli), l.ref.Purpose, l.ref.Cached, l.ref.Holders, l.ref.Lease, l.ttl)
}

// leftRefs waits, at most within, until etcd holds no reference, watching
// the reference keys from the revision of a first read, and describes
// those that are left.
func (f *farm) leftRefs(within time.Duration) ([]leftRef, error) {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	resp, err := f.cli.Get(ctx, refKeys(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	keys := map[string]bool{}
	for _, kv := range resp.Kvs {
		keys[string(kv.Key)] = true
	}
	if len(keys) > 0 {
		wch := f.cli.Watch(ctx, refKeys(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		for wr := range wch {
			if ctx.Err() != nil {
				break // waited long enough: what is left, is left
			}
			if err := wr.Err(); err != nil {
				return nil, err
			}
			for _, ev := range wr.Events {
				keys[string(ev.Kv.Key)] = ev.Type == clientv3.EventTypePut
				if !keys[string(ev.Kv.Key)] {
					delete(keys, string(ev.Kv.Key))
				}
			}
			if len(keys) == 0 {
				break
			}
		}
	}
	if len(keys) == 0 {
		return nil, nil
	}
	// Describe them, through a store of the soak's own.
	dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer dcancel()
	s, err := etcdstore.New(dctx, f.cli, f.root, etcdstore.WithHost("soak-check"), etcdstore.WithTTL(f.cfg.TTL))
	if err != nil {
		return nil, err
	}
	defer s.Close()
	ids := map[string]bool{}
	for k := range keys {
		id, _, _ := strings.Cut(strings.TrimPrefix(k, refKeys()), "/")
		ids[id] = true
	}
	var left []leftRef
	for _, id := range slices.Sorted(maps.Keys(ids)) {
		info, err := s.Inspect(dctx, id)
		if err != nil {
			return nil, err
		}
		for _, r := range info.Refs {
			l := leftRef{id: id, ref: r, ttl: -1, node: "a process of its own"}
			for _, h := range f.hosts {
				switch {
				case h.name == r.Host && h.pid() == r.PID:
					l.node = "the running node of " + h.name
				case h.name == r.Host && r.Cached: // only nodes take cached references
					l.node = "a killed node of " + h.name
				}
			}
			if lease, err := strconv.ParseInt(r.Lease, 16, 64); err == nil {
				if ttl, err := f.cli.TimeToLive(dctx, clientv3.LeaseID(lease)); err == nil {
					l.ttl = ttl.TTL
				}
			}
			left = append(left, l)
		}
	}
	return left, nil
}

// checkPackages reads every package once nothing runs any more: one that
// etcd calls available must be intact on the shared root (soakjob verify),
// and none may still be building (a build record left on a live lease
// makes every host wait for a build that no longer runs).
func (f *farm) checkPackages() (broken, stuck []string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := etcdstore.New(ctx, f.cli, f.root, etcdstore.WithHost("soak-check"), etcdstore.WithTTL(f.cfg.TTL))
	if err != nil {
		return nil, nil, err
	}
	defer s.Close()
	list, err := s.List(ctx)
	if err != nil {
		return nil, nil, err
	}
	for _, p := range list {
		switch p.State {
		case etcdstore.StateBuilding:
			b := p.Build
			stuck = append(stuck, fmt.Sprintf("%s: still building after the soak: host %s pid %d since %s (attempt %d, lock holder alive: see the node's log)",
				p.ID, b.Host, b.PID, b.Started.Format(time.StampMilli), b.Attempt))
		case etcdstore.StateAvailable:
			env := append(slices.Clone(f.hosts[0].env), jobrun.EnvPkg+"="+paths.Contents(f.root, p.ID))
			if res := f.execEnv(env, f.bin.job, "verify", p.ID); res.code != 0 {
				broken = append(broken, fmt.Sprintf("%s: available in etcd, broken on the shared root: %s", p.ID, res.tail()))
			}
		}
	}
	return broken, stuck, nil
}

// readReports returns soakjob's reports of kind ("violation" or
// "excused").
func (f *farm) readReports(kind string) ([]string, error) {
	names, err := filepath.Glob(filepath.Join(f.reports, kind+"-*.txt"))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			return nil, err
		}
		out = append(out, strings.TrimSpace(string(b)))
	}
	return out, nil
}

// nodeLogLines returns the lines of host logs that mention any of words,
// at most max of them per host, for a failure report.
func (f *farm) nodeLogLines(words []string, max int) []string {
	var out []string
	for _, h := range f.hosts {
		b, err := os.ReadFile(h.logPath)
		if err != nil {
			continue
		}
		n := 0
		for _, line := range strings.Split(string(b), "\n") {
			if n < max && slices.ContainsFunc(words, func(w string) bool { return strings.Contains(line, w) }) {
				out = append(out, h.name+": "+line)
				n++
			}
		}
	}
	return out
}

// leasesLost counts, from the nodes' logs, how many times a node lost its
// store's lease and its registration's: not a failure in itself (the
// store takes its references again), but what most of the findings follow.
func (f *farm) leasesLost() (store, registration int) {
	for _, h := range f.hosts {
		b, err := os.ReadFile(h.logPath)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			switch {
			case !strings.Contains(line, "etcd lease lost"):
			case strings.Contains(line, "lease=registration"):
				registration++
			default:
				store++
			}
		}
	}
	return store, registration
}

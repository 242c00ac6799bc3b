package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/node"
)

const cacheUsage = `usage: granary cache push [flags] ID
       granary cache pull [flags] ID
       granary cache verify [flags] ID
       granary cache keygen NAME SECRET-FILE PUBLIC-FILE

%s.

push    upload the published package ID to the remote cache (holding a
        reference while it is packed, so it cannot be removed meanwhile)
pull    make ID available from the remote cache, without building it: under
        the package's build lock, as a build would; exits 3 if the cache
        does not have it
verify  download ID's entry (without unpacking it) and say who signed it
        and whether its archive is the one its index names; exits 1 if the
        trusted keys (--cache-trusted-keys) would refuse it, 3 if absent
keygen  write a new ed25519 key pair for signing cache entries: the secret
        key to SECRET-FILE (mode 0600; give it to the hosts that upload, as
        --cache-sign-key or $GRANARY_CACHE_SIGN_KEY) and the public key to
        PUBLIC-FILE, one line NAME:BASE64 that goes into the trusted list of
        every host (--cache-trusted-keys or $GRANARY_CACHE_TRUSTED_KEYS).
        NAME names the key, e.g. ci.example.org-1. Existing files are kept.

The cache is --cache URL or $GRANARY_CACHE (http(s)://host/path,
s3://bucket/prefix[?endpoint=URL], file:///dir).
Run 'granary build -h' for the connection flags.
`

// cmdCache is `granary cache push|pull ID`.
func cmdCache(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprintf(e.stdout, cacheUsage, commands["cache"].short)
		return nil
	}
	if len(args) == 0 || (args[0] != "push" && args[0] != "pull" && args[0] != "verify" && args[0] != "keygen") {
		return usageErr("cache", "want 'push', 'pull', 'verify' or 'keygen'")
	}
	sub := args[0]
	if sub == "keygen" {
		return cacheKeygen(e, args[1:])
	}
	f, err := e.newFlags("cache", false)
	if err != nil {
		return err
	}
	id, err := e.parseID(f, args[1:])
	if err != nil {
		return err
	}
	if f.cfg.Cache == "" {
		return usageErr("cache", "no remote cache: set --cache URL or $GRANARY_CACHE")
	}
	if sub == "verify" {
		return cacheVerify(ctx, e, f.cfg, id)
	}
	var cacheEvents eventLog
	c, err := e.connect(ctx, f.cfg, etcdstore.WithEvents(cacheEvents.add), etcdstore.WithPurpose("granary cache "+sub))
	if err != nil {
		return err
	}
	defer c.Close()
	if sub == "push" {
		return cachePush(ctx, e, c, id)
	}
	return cachePull(ctx, e, c, id, &cacheEvents)
}

func cachePush(ctx context.Context, e *env, c *conn, id string) error {
	h := c.store.Handle(id)
	if err := h.IncRefContext(ctx); err != nil {
		if errors.Is(err, core.ErrPackageNotExist) {
			return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: cache push: package %q does not exist", id)}
		}
		return err
	}
	defer h.DecRefContext(context.WithoutCancel(ctx)) //nolint:errcheck // Close drops the lease anyway
	info, err := c.store.Inspect(ctx, id)
	if err != nil {
		return err
	}
	if info.Package == nil {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: cache push: package %q does not exist", id)}
	}
	before := c.cache.Stats().BytesUp
	if err := c.cache.Store(ctx, id, h.OutputDirectory(), *info.Package); err != nil {
		return fmt.Errorf("granary: %w", err)
	}
	fmt.Fprintf(e.stderr, "granary: %s: pushed to %s (%d bytes)\n", id, c.cache, c.cache.Stats().BytesUp-before)
	return nil
}

func cachePull(ctx context.Context, e *env, c *conn, id string, ev *eventLog) error {
	out, err := c.store.Handle(id).BuildOutcome(ctx, func(context.Context) error {
		// Only reached when the cache did not provide the package: give
		// the attempt up, so that hosts waiting on it build it themselves.
		return fmt.Errorf("%w: not in the remote cache", etcdstore.ErrAbandon)
	})
	switch {
	case err == nil && out.How == etcdstore.FromCache:
		fmt.Fprintf(e.stderr, "granary: %s: fetched from %s\n", id, c.cache)
		return nil
	case err == nil:
		fmt.Fprintf(e.stderr, "granary: %s: already available\n", id)
		return nil
	case ctx.Err() != nil:
		return &ExitErr{Code: 130, Err: fmt.Errorf("granary: cache pull %q interrupted; nothing was published", id)}
	case errors.Is(err, etcdstore.ErrAbandon):
		if miss := ev.last(etcdstore.EventCacheMiss); miss != nil && miss.Err != nil {
			return fmt.Errorf("granary: cache pull: %w", miss.Err) // it names the fetch and the package
		}
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: cache pull: %q is not in the remote cache %s", id, c.cache)}
	}
	return err
}

// eventLog keeps a store's events for a command to look at afterwards.
type eventLog struct {
	mu     sync.Mutex
	events []etcdstore.Event
}

func (l *eventLog) add(e etcdstore.Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
}

func (l *eventLog) last(kind etcdstore.EventKind) *etcdstore.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.events) - 1; i >= 0; i-- {
		if l.events[i].Kind == kind {
			e := l.events[i]
			return &e
		}
	}
	return nil
}

func (l *eventLog) has(kind etcdstore.EventKind) bool { return l.last(kind) != nil }

// cacheKeygen is `granary cache keygen NAME SECRET-FILE PUBLIC-FILE`.
func cacheKeygen(e *env, args []string) error {
	if len(args) != 3 {
		return usageErr("cache", "keygen wants NAME SECRET-FILE PUBLIC-FILE, got %d argument(s)", len(args))
	}
	name, secFile, pubFile := args[0], args[1], args[2]
	k, err := cache.GenerateKey(name, nil)
	if err != nil {
		return &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: cache keygen: %w", err)}
	}
	// O_EXCL: never overwrite a key that hosts may already trust.
	write := func(path, content string, mode os.FileMode) error {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
		if err != nil {
			return fmt.Errorf("granary: cache keygen: %w", err)
		}
		_, err = f.WriteString(content + "\n")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
			return fmt.Errorf("granary: cache keygen: %w", err)
		}
		return nil
	}
	if err := write(secFile, k.String(), 0o600); err != nil {
		return err
	}
	if err := write(pubFile, k.Public().String(), 0o644); err != nil {
		os.Remove(secFile)
		return err
	}
	fmt.Fprintf(e.stderr, "granary: key %q: secret key in %s (keep it to the uploading hosts), public key in %s:\n", name, secFile, pubFile)
	fmt.Fprintln(e.stdout, k.Public().String())
	return nil
}

// cacheVerify is `granary cache verify ID`: it needs the cache only, no
// etcd.
func cacheVerify(ctx context.Context, e *env, cfg node.Config, id string) error {
	r, err := cfg.OpenCache()
	if err != nil {
		return &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: %w", err)}
	}
	defer r.Close()
	ec, err := r.Verify(ctx, id)
	if errors.Is(err, cache.ErrNotCached) {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: %w", err)}
	}
	if err != nil {
		return fmt.Errorf("granary: %w", err)
	}
	w := e.stdout
	idx := ec.Index
	fmt.Fprintf(w, "%s in %s\n", id, r)
	fmt.Fprintf(w, "  digest   %s (%d bytes)\n", idx.Digest, idx.Size)
	fmt.Fprintf(w, "  archive  %d bytes, %s\n", ec.ArchiveSize, ec.ArchiveHash)
	fmt.Fprintf(w, "  created  %s by %s\n", idx.Created.Format(time.RFC3339), idx.BuiltBy)
	trusted := cfg.CacheTrustedKeys != ""
	if len(ec.Signers) == 0 {
		fmt.Fprintln(w, "  signed   by nobody")
	}
	for _, s := range ec.Signers {
		verdict := "not checked (no trusted keys configured)"
		switch {
		case s.Valid:
			verdict = "trusted key, valid signature"
		case s.Trusted:
			verdict = "trusted key, INVALID signature (the entry was changed after signing)"
		case trusted:
			verdict = "unknown key (not in the trusted list)"
		}
		fmt.Fprintf(w, "  signed   by %s: %s\n", s.Name, verdict)
	}
	if ec.Reason != "" {
		fmt.Fprintf(w, "  verdict  rejected: %s\n", ec.Reason)
		return &ExitErr{Code: 1, Err: fmt.Errorf("granary: cache verify: %q would be rejected: %s", id, ec.Reason)}
	}
	if trusted {
		fmt.Fprintln(w, "  verdict  accepted")
	} else {
		fmt.Fprintln(w, "  verdict  archive matches its index (signatures not checked: no trusted keys configured)")
	}
	return nil
}

// fetchProgress shows a slow cache fetch: on a terminal a line a second,
// otherwise a line every 10 s. Fast fetches (under a second) show nothing.
func fetchProgress(w io.Writer, tty bool) func(cache.Progress) {
	return func(p cache.Progress) {
		secs := p.Elapsed.Seconds()
		if p.Done {
			if tty {
				fmt.Fprintln(w) // end the line the reports rewrote
			}
			return
		}
		if !tty && int(secs)%10 != 0 {
			return
		}
		line := fmt.Sprintf("granary: %s: fetching from the remote cache: %.1f of %.1f MiB, %.1f MiB/s",
			p.ID, float64(p.Bytes)/(1<<20), float64(p.Total)/(1<<20), float64(p.Bytes)/(1<<20)/secs)
		if tty {
			fmt.Fprintf(w, "\r\033[K%s", line)
		} else {
			fmt.Fprintln(w, line)
		}
	}
}

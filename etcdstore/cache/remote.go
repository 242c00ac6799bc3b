package cache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
)

var _ etcdstore.Cache = (*Remote)(nil)

// FormatVersion is the version of the archive format and index written by
// this package. Entries of another version are misses.
const FormatVersion = 1

// Index is the small JSON document stored beside each archive
// (<id>.json next to <id>.tar.zst). It is written after the archive, so a
// reader that finds an index finds its archive.
type Index struct {
	ID          string    `json:"id"`
	Format      int       `json:"format"`       // FormatVersion
	Digest      string    `json:"digest"`       // etcdstore.TreeDigest of the tree
	Size        int64     `json:"size"`         // bytes of regular files
	ArchiveSize int64     `json:"archive_size"` // bytes of <id>.tar.zst
	Created     time.Time `json:"created"`
	BuiltBy     string    `json:"built_by,omitempty"`
	// ArchiveHash is "sha256:" and the hex SHA-256 of <id>.tar.zst.
	ArchiveHash string `json:"archive_hash,omitempty"`
	// Signatures are NAME:BASE64 ed25519 signatures of the entry's
	// fingerprint: format, id, digest, size, archive size and archive
	// hash (not Created nor BuiltBy, which are for people).
	Signatures []string `json:"signatures,omitempty"`
}

// maxIndexSize bounds the index a reader accepts.
const maxIndexSize = 64 << 10

// Names of an entry's two objects, relative to the cache's base.
func archiveName(id string) string { return id + ".tar.zst" }
func indexName(id string) string   { return id + ".json" }

// errNotFound is what a backend returns for a missing object.
var errNotFound = errors.New("not found")

// backend stores named objects: a directory or an HTTP file server.
type backend interface {
	// open returns the object, or errNotFound.
	open(ctx context.Context, name string) (io.ReadCloser, error)
	// write stores an object whose content fill writes, replacing any
	// old one in a single step as readers see it.
	write(ctx context.Context, name string, fill func(io.Writer) error) error
	// exists reports whether the object is there.
	exists(ctx context.Context, name string) (bool, error)
	// String names the location for errors ("https://…", "/mnt/cache").
	String() string
	// close releases idle connections.
	close()
}

// Stats are a Remote's counters since it was opened.
type Stats struct {
	Hits           int64 // Fetch found and unpacked a verified package
	Misses         int64 // Fetch found no entry
	FetchErrors    int64 // Fetch failed (network, corrupt or unsafe archive, digest mismatch)
	Uploads        int64 // Store succeeded
	UploadFailures int64 // Store failed
	BytesDown      int64 // archive and index bytes read
	BytesUp        int64 // archive and index bytes written
	// BudgetSpent counts the fetches that ran out of their budget (also
	// counted in FetchErrors).
	BudgetSpent int64
	// Rejected counts, by reason, the entries refused by the signature
	// checks (not counted in FetchErrors). Every Reason has a key.
	Rejected map[Reason]int64
}

type counters struct {
	hits, misses, fetchErrors, uploads, uploadFailures, bytesDown, bytesUp, budgetSpent atomic.Int64
	rejected                                                                            map[Reason]*atomic.Int64
}

// Progress is what WithProgress reports during a Fetch.
type Progress struct {
	ID      string
	Bytes   int64         // archive bytes received so far
	Total   int64         // the archive's size according to its index
	Elapsed time.Duration // since the Fetch started
	// Done marks the last report of a Fetch, sent when the transfer ends
	// (whatever its outcome) if any report was sent before it.
	Done bool
}

// Remote is a remote cache of published packages: an HTTP file server or a
// directory, holding <id>.tar.zst (see Pack) and <id>.json (Index) per
// package. It implements etcdstore.Cache and is safe for concurrent use.
// A miss is never remembered: the next Fetch asks again.
type Remote struct {
	b   backend
	lim Limits
	o   options
	c   counters
}

func newRemote(b backend, o options) *Remote {
	r := &Remote{b: b, lim: o.limits, o: o}
	r.c.rejected = make(map[Reason]*atomic.Int64, len(Reasons))
	for _, reason := range Reasons {
		r.c.rejected[reason] = new(atomic.Int64)
	}
	return r
}

// Stats returns the counters so far.
func (r *Remote) Stats() Stats {
	s := Stats{
		Hits: r.c.hits.Load(), Misses: r.c.misses.Load(), FetchErrors: r.c.fetchErrors.Load(),
		Uploads: r.c.uploads.Load(), UploadFailures: r.c.uploadFailures.Load(),
		BytesDown: r.c.bytesDown.Load(), BytesUp: r.c.bytesUp.Load(), BudgetSpent: r.c.budgetSpent.Load(),
	}
	s.Rejected = make(map[Reason]int64, len(r.c.rejected))
	for reason, n := range r.c.rejected {
		s.Rejected[reason] = n.Load()
	}
	return s
}

// String returns the cache's location (without credentials).
func (r *Remote) String() string { return r.b.String() }

// Close releases the idle HTTP connections. A Remote stays usable after
// Close (it opens new connections); close it when done with it so no
// connection outlives its user.
func (r *Remote) Close() error {
	r.b.close()
	return nil
}

// Fetch unpacks package id into dir, an existing empty directory, if the
// cache has it, and verifies the tree against the digest in its index. A
// missing index or archive is a miss, (false, nil). An unreadable index, an
// unsafe or corrupt archive, or a digest mismatch is an error; dir may then
// hold a partial tree, which etcdstore clears before building.
//
// With trusted keys (WithTrustedKeys), the index must carry a valid
// signature by one of them, and the archive is downloaded to a temporary
// file and checked against the signed length and SHA-256 before it is
// unpacked; an entry that fails is a *RejectedError and nothing of it is
// unpacked.
//
// Fetch blocks for the transfer; each request has the cache's deadlines,
// and the whole is bounded by ctx and by the fetch budget
// (WithFetchBudget), after which it fails with ErrFetchBudget.
func (r *Remote) Fetch(ctx context.Context, id, dir string) (bool, error) {
	start := time.Now()
	bctx, cancel := context.WithTimeoutCause(ctx, r.o.budget, fmt.Errorf("%w (%v)", ErrFetchBudget, r.o.budget))
	defer cancel()
	ok, err := r.fetch(bctx, id, dir, start)
	if err != nil && ctx.Err() == nil && errors.Is(context.Cause(bctx), ErrFetchBudget) {
		r.c.budgetSpent.Add(1)
		elapsed := time.Since(start).Round(time.Millisecond)
		if errors.Is(err, ErrFetchBudget) {
			err = fmt.Errorf("gave up after %v: %w", elapsed, err)
		} else {
			err = fmt.Errorf("gave up after %v: %w: %w", elapsed, context.Cause(bctx), err)
		}
	}
	var rej *RejectedError
	switch {
	case errors.As(err, &rej):
		r.c.rejected[rej.Reason].Add(1)
		return false, fmt.Errorf("fetch %q from cache %s: %w", id, r.b, err)
	case err != nil:
		r.c.fetchErrors.Add(1)
		return false, fmt.Errorf("fetch %q from cache %s: %w", id, r.b, err)
	case ok:
		r.c.hits.Add(1)
	default:
		r.c.misses.Add(1)
	}
	return ok, nil
}

func (r *Remote) fetch(ctx context.Context, id, dir string, start time.Time) (bool, error) {
	if err := core.ValidateID(id); err != nil {
		return false, err
	}
	idx, err := r.index(ctx, id)
	if errors.Is(err, errNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if idx.Format != FormatVersion {
		return false, nil // written by another version: as good as absent
	}
	if idx.ID != id || idx.Digest == "" {
		return false, fmt.Errorf("index names package %q with digest %q", idx.ID, idx.Digest)
	}
	signed := len(r.o.trusted) > 0
	if signed {
		if reason := idx.verify(r.o.trusted); reason != "" {
			return false, &RejectedError{ID: id, Reason: reason, Detail: signerText(idx.signers(r.o.trusted))}
		}
	}
	rc, err := r.b.open(ctx, archiveName(id))
	if errors.Is(err, errNotFound) {
		return false, nil // removed since the index was read
	}
	if err != nil {
		return false, err
	}
	defer rc.Close()
	got := &countingReader{r: rc, n: &r.c.bytesDown}
	stop := r.reportProgress(id, got, idx.ArchiveSize, start)
	defer stop()
	var src io.Reader = got
	if signed {
		f, err := r.spool(ctx, id, got, idx)
		if err != nil {
			return false, err
		}
		defer os.Remove(f.Name())
		defer f.Close()
		src = &ctxReader{ctx: ctx, f: f}
	}
	if _, err := Unpack(src, dir, r.lim); err != nil {
		return false, err
	}
	digest, _, err := etcdstore.TreeDigest(dir)
	if err != nil {
		return false, err
	}
	if digest != idx.Digest {
		err := fmt.Errorf("%w: archive unpacks to %s, index says %s", etcdstore.ErrDigestMismatch, digest, idx.Digest)
		if signed {
			return false, &RejectedError{ID: id, Reason: ReasonDigestMismatch, Detail: err.Error()}
		}
		return false, err
	}
	return true, nil
}

// spool copies a signed entry's archive into a temporary file, checking
// its length and SHA-256 against the index, and returns the file at its
// start. The caller removes it.
func (r *Remote) spool(ctx context.Context, id string, src io.Reader, idx *Index) (*os.File, error) {
	if !strings.HasPrefix(idx.ArchiveHash, "sha256:") {
		return nil, &RejectedError{ID: id, Reason: ReasonArchiveMismatch, Detail: "the signed index names no SHA-256"}
	}
	f, err := os.CreateTemp(r.o.tempDir, "granary-fetch-*")
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	h := sha256.New()
	// One byte more than signed tells a longer archive apart; a hostile
	// server cannot fill the disk.
	n, err := io.Copy(&ctxWriter{ctx: ctx, w: io.MultiWriter(f, h)}, io.LimitReader(src, idx.ArchiveSize+1))
	if err != nil {
		return nil, err
	}
	if sum := "sha256:" + hex.EncodeToString(h.Sum(nil)); n != idx.ArchiveSize || sum != idx.ArchiveHash {
		return nil, &RejectedError{ID: id, Reason: ReasonArchiveMismatch,
			Detail: fmt.Sprintf("got %d bytes with %s, the signed index says %d bytes with %s", n, sum, idx.ArchiveSize, idx.ArchiveHash)}
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	ok = true
	return f, nil
}

// reportProgress calls the progress hook about once a second until the
// returned stop is called; stop waits for the last call.
func (r *Remote) reportProgress(id string, got *countingReader, total int64, start time.Time) (stop func()) {
	if r.o.progress == nil {
		return func() {}
	}
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		reported := false
		for {
			select {
			case <-done:
				if reported {
					r.o.progress(Progress{ID: id, Bytes: got.total.Load(), Total: total, Elapsed: time.Since(start), Done: true})
				}
				return
			case <-t.C:
				reported = true
				r.o.progress(Progress{ID: id, Bytes: got.total.Load(), Total: total, Elapsed: time.Since(start)})
			}
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}

func signerText(signers []Signer) string {
	if len(signers) == 0 {
		return "no signature"
	}
	var parts []string
	for _, s := range signers {
		switch {
		case s.Valid:
			parts = append(parts, "signed by trusted key "+strconv.Quote(s.Name))
		case s.Trusted:
			parts = append(parts, "signature of trusted key "+strconv.Quote(s.Name)+" does not verify")
		default:
			parts = append(parts, "signed by unknown key "+strconv.Quote(s.Name))
		}
	}
	return strings.Join(parts, "; ")
}

// index reads and decodes id's index.
func (r *Remote) index(ctx context.Context, id string) (*Index, error) {
	rc, err := r.b.open(ctx, indexName(id))
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(&countingReader{r: rc, n: &r.c.bytesDown}, maxIndexSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxIndexSize {
		return nil, fmt.Errorf("index is larger than %d bytes", maxIndexSize)
	}
	idx := new(Index)
	if err := json.Unmarshal(b, idx); err != nil {
		return nil, fmt.Errorf("corrupt index: %w", err)
	}
	return idx, nil
}

// Contains reports whether the cache has an index for id, without
// downloading anything.
func (r *Remote) Contains(ctx context.Context, id string) (bool, error) {
	if err := core.ValidateID(id); err != nil {
		return false, err
	}
	ok, err := r.b.exists(ctx, indexName(id))
	if err != nil {
		return false, fmt.Errorf("look up %q in cache %s: %w", id, r.b, err)
	}
	return ok, nil
}

// Store packs the published tree at dir and uploads it, the archive first
// and the index last, so readers never see an index without its archive.
// rec is the package's published record: if the tree packed does not add up
// to rec.Size, it changed since it was published and nothing is indexed.
// Store blocks for the upload; each request has the cache's deadlines and
// is retried on transient errors.
func (r *Remote) Store(ctx context.Context, id, dir string, rec etcdstore.PackageRecord) error {
	err := r.store(ctx, id, dir, rec)
	if err != nil {
		r.c.uploadFailures.Add(1)
		return fmt.Errorf("store %q in cache %s: %w", id, r.b, err)
	}
	r.c.uploads.Add(1)
	return nil
}

func (r *Remote) store(ctx context.Context, id, dir string, rec etcdstore.PackageRecord) error {
	if err := core.ValidateID(id); err != nil {
		return err
	}
	if rec.Digest == "" {
		return errors.New("the package record has no digest")
	}
	if _, err := os.Stat(dir); err != nil {
		return err
	}
	var archiveSize int64
	var archiveHash string
	err := r.b.write(ctx, archiveName(id), func(w io.Writer) error {
		h := sha256.New()
		cw := &countingWriter{w: io.MultiWriter(w, h)}
		st, err := Pack(cw, dir)
		if err == nil && st.Bytes != rec.Size {
			err = fmt.Errorf("tree at %s holds %d bytes, but %d were published: it changed", dir, st.Bytes, rec.Size)
		}
		archiveSize = cw.n
		archiveHash = "sha256:" + hex.EncodeToString(h.Sum(nil))
		return err
	})
	if err != nil {
		return err
	}
	r.c.bytesUp.Add(archiveSize)
	idx := Index{ID: id, Format: FormatVersion, Digest: rec.Digest, Size: rec.Size, ArchiveSize: archiveSize,
		Created: time.Now().UTC(), BuiltBy: rec.BuiltBy, ArchiveHash: archiveHash}
	if r.o.signKey != nil {
		idx.sign(r.o.signKey)
	}
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if err := r.b.write(ctx, indexName(id), func(w io.Writer) error { _, err := w.Write(b); return err }); err != nil {
		return err
	}
	r.c.bytesUp.Add(int64(len(b)))
	return nil
}

// countingReader adds what it reads to n (a Remote's counter) and to its
// own total.
type countingReader struct {
	r     io.Reader
	n     *atomic.Int64
	total atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	c.total.Add(int64(n))
	return n, err
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// EntryCheck is what Verify found out about one cache entry.
type EntryCheck struct {
	Index Index
	// Signers is each of the index's signatures, checked against the
	// trusted keys (WithTrustedKeys).
	Signers []Signer
	// Reason is why Fetch would refuse the entry with the trusted keys
	// configured, or "" if it would accept it (always "" without trusted
	// keys, unless the archive does not match).
	Reason Reason
	// ArchiveSize and ArchiveHash are the archive as downloaded.
	ArchiveSize int64
	ArchiveHash string
}

// Verify downloads id's index and archive (without unpacking anything) and
// reports who signed the entry and whether the archive is the one the index
// names. An entry the cache does not have is ErrNotCached.
func (r *Remote) Verify(ctx context.Context, id string) (*EntryCheck, error) {
	if err := core.ValidateID(id); err != nil {
		return nil, err
	}
	wrap := func(err error) error { return fmt.Errorf("verify %q in cache %s: %w", id, r.b, err) }
	idx, err := r.index(ctx, id)
	if errors.Is(err, errNotFound) {
		return nil, wrap(ErrNotCached)
	}
	if err != nil {
		return nil, wrap(err)
	}
	ec := &EntryCheck{Index: *idx, Signers: idx.signers(r.o.trusted)}
	if len(r.o.trusted) > 0 {
		ec.Reason = idx.verify(r.o.trusted)
	}
	rc, err := r.b.open(ctx, archiveName(id))
	if errors.Is(err, errNotFound) {
		return nil, wrap(fmt.Errorf("%w: the index is there but not the archive", ErrNotCached))
	}
	if err != nil {
		return nil, wrap(err)
	}
	defer rc.Close()
	h := sha256.New()
	ec.ArchiveSize, err = io.Copy(h, &countingReader{r: rc, n: &r.c.bytesDown})
	if err != nil {
		return nil, wrap(err)
	}
	ec.ArchiveHash = "sha256:" + hex.EncodeToString(h.Sum(nil))
	if ec.Reason == "" && (ec.ArchiveSize != idx.ArchiveSize || idx.ArchiveHash != "" && ec.ArchiveHash != idx.ArchiveHash) {
		ec.Reason = ReasonArchiveMismatch
	}
	return ec, nil
}

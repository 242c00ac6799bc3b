package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
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
}

type counters struct {
	hits, misses, fetchErrors, uploads, uploadFailures, bytesDown, bytesUp atomic.Int64
}

// Remote is a remote cache of published packages: an HTTP file server or a
// directory, holding <id>.tar.zst (see Pack) and <id>.json (Index) per
// package. It implements etcdstore.Cache and is safe for concurrent use.
// A miss is never remembered: the next Fetch asks again.
type Remote struct {
	b   backend
	lim Limits
	c   counters
}

// Stats returns the counters so far.
func (r *Remote) Stats() Stats {
	return Stats{
		Hits: r.c.hits.Load(), Misses: r.c.misses.Load(), FetchErrors: r.c.fetchErrors.Load(),
		Uploads: r.c.uploads.Load(), UploadFailures: r.c.uploadFailures.Load(),
		BytesDown: r.c.bytesDown.Load(), BytesUp: r.c.bytesUp.Load(),
	}
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
// hold a partial tree, which etcdstore clears before building. Fetch blocks
// for the transfer; each request has the cache's deadlines and ctx bounds
// the whole.
func (r *Remote) Fetch(ctx context.Context, id, dir string) (bool, error) {
	ok, err := r.fetch(ctx, id, dir)
	switch {
	case err != nil:
		r.c.fetchErrors.Add(1)
		return false, fmt.Errorf("cache: fetch %q from %s: %w", id, r.b, err)
	case ok:
		r.c.hits.Add(1)
	default:
		r.c.misses.Add(1)
	}
	return ok, nil
}

func (r *Remote) fetch(ctx context.Context, id, dir string) (bool, error) {
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
	rc, err := r.b.open(ctx, archiveName(id))
	if errors.Is(err, errNotFound) {
		return false, nil // removed since the index was read
	}
	if err != nil {
		return false, err
	}
	defer rc.Close()
	if _, err := Unpack(&countingReader{rc, &r.c.bytesDown}, dir, r.lim); err != nil {
		return false, err
	}
	digest, _, err := etcdstore.TreeDigest(dir)
	if err != nil {
		return false, err
	}
	if digest != idx.Digest {
		return false, fmt.Errorf("%w: archive unpacks to %s, index says %s", etcdstore.ErrDigestMismatch, digest, idx.Digest)
	}
	return true, nil
}

// index reads and decodes id's index.
func (r *Remote) index(ctx context.Context, id string) (*Index, error) {
	rc, err := r.b.open(ctx, indexName(id))
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(&countingReader{rc, &r.c.bytesDown}, maxIndexSize+1))
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
		return false, fmt.Errorf("cache: look up %q in %s: %w", id, r.b, err)
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
		return fmt.Errorf("cache: store %q in %s: %w", id, r.b, err)
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
	err := r.b.write(ctx, archiveName(id), func(w io.Writer) error {
		cw := &countingWriter{w: w}
		st, err := Pack(cw, dir)
		if err == nil && st.Bytes != rec.Size {
			err = fmt.Errorf("tree at %s holds %d bytes, but %d were published: it changed", dir, st.Bytes, rec.Size)
		}
		archiveSize = cw.n
		return err
	})
	if err != nil {
		return err
	}
	r.c.bytesUp.Add(archiveSize)
	idx := Index{ID: id, Format: FormatVersion, Digest: rec.Digest, Size: rec.Size, ArchiveSize: archiveSize,
		Created: time.Now().UTC(), BuiltBy: rec.BuiltBy}
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

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
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

package cache

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
)

// Limits bound what Unpack accepts, so a hostile or corrupt archive cannot
// fill the disk or the memory of the host that fetches it.
type Limits struct {
	// MaxBytes caps the total size of the regular files.
	MaxBytes int64
	// MaxEntries caps the number of files, directories and symlinks.
	MaxEntries int
	// MaxWindow caps the zstd window (the memory the decoder may need).
	MaxWindow uint64
}

// Fixed limits on names: longer paths cannot be opened on Linux anyway,
// and each level of depth costs a walk through os.Root for every entry
// below it, so a small archive of very deep directories would burn CPU
// under the build lock.
const (
	MaxNameLen = 4095 // bytes of an entry's path
	MaxDepth   = 256  // directories in an entry's path
)

// Default limits.
const (
	DefaultMaxBytes   = 64 << 30 // 64 GiB
	DefaultMaxEntries = 1 << 20  // 1M entries
	DefaultMaxWindow  = 64 << 20 // 64 MiB; the encoder uses at most 8 MiB at its default level
)

// DefaultLimits returns DefaultMaxBytes, DefaultMaxEntries and
// DefaultMaxWindow.
func DefaultLimits() Limits {
	return Limits{MaxBytes: DefaultMaxBytes, MaxEntries: DefaultMaxEntries, MaxWindow: DefaultMaxWindow}
}

func (l Limits) validate() error {
	if l.MaxBytes <= 0 || l.MaxEntries <= 0 || l.MaxWindow < zstd.MinWindowSize {
		return fmt.Errorf("limits %+v: bytes and entries must be positive, window at least %d", l, zstd.MinWindowSize)
	}
	return nil
}

// PackStats says what Pack wrote.
type PackStats struct {
	Entries int   // files, directories and symlinks
	Bytes   int64 // bytes of regular files (etcdstore.PackageRecord.Size)
}

// epoch is the modification time of every entry: times are not part of a
// package (TreeDigest ignores them), and fixed times make archives of equal
// trees equal.
var epoch = time.Unix(0, 0).UTC()

// Pack writes the tree at dir to w as a zstd-compressed tar: directories,
// regular files (permission bits kept) and symlinks whose targets are
// relative and stay inside the tree, parents before children, in lexical
// order. Any other entry (device, fifo, socket, a symlink leading out of the
// tree) is an error: such a package cannot be cached. Pack does not close w.
func Pack(w io.Writer, dir string) (PackStats, error) {
	var st PackStats
	zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		return st, err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return st, err
	}
	defer root.Close()
	tw := tar.NewWriter(zw)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		rel = filepath.ToSlash(rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr := &tar.Header{Name: rel, ModTime: epoch, Mode: int64(info.Mode().Perm()), Format: tar.FormatPAX}
		mode := info.Mode()
		switch {
		case mode.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
		case mode.IsRegular():
			hdr.Typeflag, hdr.Size = tar.TypeReg, info.Size()
		case mode&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if !linkInside(rel, target) {
				return fmt.Errorf("symlink %s -> %s leads out of the package; such a package cannot be cached", rel, target)
			}
			// The check Unpack makes after extraction: resolved for real
			// (through other links), it must stay inside. A loop or a
			// chained escape would otherwise upload an archive every
			// fetch refuses.
			if _, err := root.Stat(rel); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("symlink %s -> %s does not resolve inside the package (%v); such a package cannot be cached", rel, target, err)
			}
			hdr.Typeflag, hdr.Linkname, hdr.Mode = tar.TypeSymlink, target, 0o777
		default:
			return fmt.Errorf("%s: unsupported file type %v", rel, mode.Type())
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		st.Entries++
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		n, err := io.Copy(tw, f) // tar refuses to write more than hdr.Size
		if err == nil && n != hdr.Size {
			err = fmt.Errorf("%s changed while it was packed (%d bytes, then %d)", rel, hdr.Size, n)
		}
		st.Bytes += n
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := zw.Close(); err == nil {
		err = cerr
	}
	return st, err
}

// linkInside reports whether a symlink at rel (slash-separated, relative
// to the tree) with target stays inside the tree, resolving lexically.
func linkInside(rel, target string) bool {
	if target == "" || path.IsAbs(target) || strings.ContainsRune(target, 0) {
		return false
	}
	res := path.Join(path.Dir(rel), target)
	return res != ".." && !strings.HasPrefix(res, "../")
}

// Unpack extracts a Pack archive from r into dir, which must exist and be
// empty. It is safe on hostile input: every name must be relative,
// canonical and unique, and its parent a directory the archive created
// before it (so nothing is ever written through a symlink); symlinks must
// stay inside the tree; only directories, regular files and symlinks are
// accepted; lim caps the bytes, entries and zstd window. All access goes
// through an os.Root on dir as a second line of defence. On error, dir may
// hold a partial tree that the caller must clear; nothing is written
// outside dir. Files keep the archive's permission bits; directories are
// left owner-writable (etcdstore seals the tree when it publishes it).
func Unpack(r io.Reader, dir string, lim Limits) (st PackStats, err error) {
	defer func() {
		window := errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded)
		if window && !errors.Is(err, ErrUnsafeArchive) {
			err = fmt.Errorf("%w: zstd window above %d bytes: %w", ErrUnsafeArchive, lim.MaxWindow, err)
		}
	}()
	if err := lim.validate(); err != nil {
		return st, err
	}
	if ents, err := os.ReadDir(dir); err != nil {
		return st, err
	} else if len(ents) > 0 {
		return st, fmt.Errorf("unpack into %s: directory is not empty", dir)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return st, err
	}
	defer root.Close()
	zr, err := zstd.NewReader(r, zstd.WithDecoderMaxWindow(lim.MaxWindow), zstd.WithDecoderMaxMemory(lim.MaxWindow),
		zstd.WithDecoderConcurrency(1))
	if err != nil {
		return st, err
	}
	defer zr.Close()
	u := &unpacker{
		root: root, tr: tar.NewReader(zr), lim: lim,
		dirs: map[string]bool{".": true}, seen: map[string]bool{},
		parents: &parentRoots{root: root}, buf: make([]byte, 1<<20),
	}
	defer u.parents.close()
	for {
		hdr, err := u.tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return u.st, fmt.Errorf("read archive: %w", err)
		}
		if err := u.entry(hdr); err != nil {
			return u.st, err
		}
	}
	return u.st, u.finish()
}

// unpacker is the state of one Unpack: what the archive has created so far
// and what is left to do once every entry is written.
type unpacker struct {
	root    *os.Root
	tr      *tar.Reader
	lim     Limits
	st      PackStats
	dirs    map[string]bool // directories this archive created
	seen    map[string]bool // every name so far
	modes   []dirMode       // directory modes, applied last
	links   []string        // symlinks, resolved for real at the end
	parents *parentRoots
	buf     []byte
}

// unsafeErr is ErrUnsafeArchive with what was refused.
func unsafeErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsafeArchive, fmt.Sprintf(format, args...))
}

// name returns hdr's name if it is safe to create: bounded, canonical,
// relative, new, under a directory of this archive, within the entry limit.
func (u *unpacker) name(hdr *tar.Header) (string, error) {
	name := hdr.Name
	if len(name) > MaxNameLen || strings.Count(name, "/") > MaxDepth {
		return "", unsafeErr("entry %.64q…: longer than %d bytes or deeper than %d directories", name, MaxNameLen, MaxDepth)
	}
	if hdr.Typeflag == tar.TypeDir {
		name = strings.TrimSuffix(name, "/")
	}
	if name == "" || path.IsAbs(name) || path.Clean(name) != name || name == "." || name == ".." ||
		strings.HasPrefix(name, "../") || strings.ContainsAny(name, "\x00\\") {
		return "", unsafeErr("entry %q: not a canonical relative path", hdr.Name)
	}
	if u.seen[name] {
		return "", unsafeErr("entry %q appears twice", name)
	}
	u.seen[name] = true
	if !u.dirs[path.Dir(name)] {
		return "", unsafeErr("entry %q: its parent is not a directory of the archive", name)
	}
	if u.st.Entries++; u.st.Entries > u.lim.MaxEntries {
		return "", unsafeErr("more than %d entries", u.lim.MaxEntries)
	}
	return name, nil
}

// entry creates one archive entry: a directory, a regular file or a
// symlink that stays inside the tree; anything else is refused.
func (u *unpacker) entry(hdr *tar.Header) error {
	name, err := u.name(hdr)
	if err != nil {
		return err
	}
	perm := fs.FileMode(hdr.Mode).Perm()
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := u.root.Mkdir(name, 0o700); err != nil {
			return err
		}
		u.dirs[name] = true
		u.modes = append(u.modes, dirMode{name, perm | 0o700})
	case tar.TypeReg:
		if hdr.Size < 0 || hdr.Size > u.lim.MaxBytes-u.st.Bytes {
			return unsafeErr("entry %q: more than %d bytes in all", name, u.lim.MaxBytes)
		}
		pr, err := u.parents.open(path.Dir(name))
		if err != nil {
			return err
		}
		if err := writeFile(pr, name, path.Base(name), perm, u.tr, hdr.Size, u.buf); err != nil {
			return err
		}
		u.st.Bytes += hdr.Size
	case tar.TypeSymlink:
		if !linkInside(name, hdr.Linkname) {
			return unsafeErr("symlink %q -> %q leads out of the tree", name, hdr.Linkname)
		}
		if err := u.root.Symlink(hdr.Linkname, name); err != nil {
			return err
		}
		u.links = append(u.links, name)
	default:
		return unsafeErr("entry %q: type %q not allowed (only directories, files, symlinks)", name, hdr.Typeflag)
	}
	return nil
}

// finish checks the symlinks for real and applies the directory modes.
func (u *unpacker) finish() error {
	// A target that is lexically inside can still lead out through another
	// symlink ("d/s -> ..", "d/t -> s/../.."): resolve each one for real,
	// through the Root, which refuses to leave dir. A dangling link is fine.
	for _, name := range u.links {
		if _, err := u.root.Stat(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return unsafeErr("symlink %q leads out of the tree: %v", name, err)
		}
	}
	// Directory modes last: a read-only directory could not take children.
	for _, d := range u.modes {
		if err := chmodDir(u.root, d.name, d.mode); err != nil {
			return err
		}
	}
	return nil
}

type dirMode struct {
	name string
	mode fs.FileMode
}

// parentRoots keeps an os.Root open on the directory files were last
// written into: archives list a directory's files together, and opening
// through the top Root would walk every path component for every file.
type parentRoots struct {
	root    *os.Root
	curName string
	cur     *os.Root
}

func (p *parentRoots) open(dir string) (*os.Root, error) {
	if dir == "." {
		return p.root, nil
	}
	if p.cur != nil && p.curName == dir {
		return p.cur, nil
	}
	p.close()
	r, err := p.root.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	p.cur, p.curName = r, dir
	return r, nil
}

func (p *parentRoots) close() {
	if p.cur != nil {
		p.cur.Close()
		p.cur = nil
	}
}

// writeFile creates base in dir (name is its path in the archive, for
// errors) with the next size bytes of r, copied through buf.
func writeFile(dir *os.Root, name, base string, perm fs.FileMode, r io.Reader, size int64, buf []byte) error {
	f, err := dir.OpenFile(base, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	// struct{io.Writer} hides File.ReadFrom, which would copy in 32 KiB
	// writes; one large buffer saves most of the system calls.
	n, err := io.CopyBuffer(struct{ io.Writer }{f}, io.LimitReader(r, size), buf)
	if err == nil && n != size {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		err = fmt.Errorf("unpack %q (%d of %d bytes): %w", name, n, size, err)
	}
	if err == nil {
		err = f.Chmod(perm) // by the handle: never through a path
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func chmodDir(root *os.Root, name string, mode fs.FileMode) error {
	f, err := root.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Chmod(mode)
}

package etcdstore

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// TreeDigest returns "sha256:<hex>" over the tree at dir: for each entry in
// lexical order, its relative path, its type, whether it is executable,
// a file's contents and a symlink's target. Write permissions and times do
// not count, so sealing a tree (making it read-only) keeps its digest. It
// also returns the total size of the regular files.
func TreeDigest(dir string) (digest string, size int64, err error) {
	return walkTree(dir, false)
}

// sealTree computes TreeDigest and makes every file and directory of the
// tree read-only, in one walk.
func sealTree(dir string) (digest string, size int64, err error) {
	return walkTree(dir, true)
}

// sealProgressEvery is how often sealPackage reports (tests shorten it).
var sealProgressEvery = time.Second

// sealPackage is sealTree on package id's output directory, telling the
// event hook how far it got once a second when it takes longer than one
// (EventSealing), and that it is done if it told anything.
func (s *Store) sealPackage(id string) (digest string, size int64, err error) {
	start := time.Now()
	next := start.Add(sealProgressEvery)
	var files int64
	told := false
	tell := func(done bool) {
		s.emit(Event{Kind: EventSealing, ID: id, Host: s.opt.host, PID: s.pid, Files: files, Size: size, Elapsed: time.Since(start), Done: done})
	}
	digest, size, err = walkTreeProgress(s.outputDir(id), true, func(f, n int64) {
		files, size = f, n
		if now := time.Now(); !now.Before(next) {
			next = now.Add(sealProgressEvery)
			told = true
			tell(false)
		}
	})
	if told {
		tell(true)
	}
	return digest, size, err
}

func walkTree(dir string, seal bool) (string, int64, error) {
	return walkTreeProgress(dir, seal, nil)
}

// progressWriter calls tick with the bytes written so far.
type progressWriter struct {
	w    io.Writer
	n    *int64
	tick func()
}

func (p progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	*p.n += int64(n)
	p.tick()
	return n, err
}

// walkTreeProgress is walkTree calling progress (if not nil) with the files
// and bytes done so far, after each file and during big ones.
func walkTreeProgress(dir string, seal bool, progress func(files, bytes int64)) (string, int64, error) {
	h := sha256.New()
	var files int64
	tick := func() {}
	var size int64
	if progress != nil {
		tick = func() { progress(files, size) }
	}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := info.Mode()
		exec := mode.Perm()&0o111 != 0
		switch {
		case mode.IsDir():
			fmt.Fprintf(h, "d %q\n", rel)
		case mode.IsRegular():
			fmt.Fprintf(h, "f %q %t %d\n", rel, exec, info.Size())
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(progressWriter{h, &size, tick}, f)
			f.Close()
			if err != nil {
				return err
			}
			files++
			tick()
		case mode&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "l %q %q\n", rel, target)
			return nil // symlinks have no permissions of their own
		default:
			return fmt.Errorf("%s: unsupported file type %v", p, mode.Type())
		}
		if seal && mode.Perm()&0o222 != 0 {
			return os.Chmod(p, mode.Perm()&^0o222)
		}
		return nil
	})
	if err != nil {
		return "", 0, err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), size, nil
}

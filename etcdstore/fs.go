package etcdstore

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
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

func walkTree(dir string, seal bool) (string, int64, error) {
	h := sha256.New()
	var size int64
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
			n, err := io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			size += n
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

package archdoc

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"sort"
	"testing"
)

// longFunc is a function over the limit.
type longFunc struct {
	pos   token.Position
	name  string
	lines int
}

// funcName is "name" for a function and "(Recv).name" for a method.
func funcName(fd *ast.FuncDecl) string {
	if fd.Recv == nil || len(fd.Recv.List) == 0 {
		return fd.Name.Name
	}
	t := fd.Recv.List[0].Type
	for {
		switch x := t.(type) {
		case *ast.StarExpr:
			t = x.X
			continue
		case *ast.IndexExpr:
			t = x.X
			continue
		case *ast.IndexListExpr:
			t = x.X
			continue
		case *ast.Ident:
			return "(" + x.Name + ")." + fd.Name.Name
		}
		return fd.Name.Name
	}
}

// TestNoLongFunctions fails when a non-test function (or method) anywhere
// in the repository is longer than MaxFuncLines, counted from its func line
// to its closing brace. Function literals count toward the function that
// holds them. Each offender is printed as file:line, its name and length,
// longest first.
func TestNoLongFunctions(t *testing.T) {
	root := repoRoot(t)
	fset := token.NewFileSet()
	var long []longFunc
	for _, rel := range sourceFiles(t, root) {
		f, err := parser.ParseFile(fset, filepath.Join(root, filepath.FromSlash(rel)), nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatalf("parse %s: %v", rel, err)
		}
		for _, d := range f.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || fd.Body == nil {
				continue
			}
			start := fset.Position(fd.Pos())
			end := fset.Position(fd.End())
			if n := end.Line - start.Line + 1; n > MaxFuncLines {
				start.Filename = rel
				long = append(long, longFunc{pos: start, name: funcName(fd), lines: n})
			}
		}
	}
	sort.Slice(long, func(i, j int) bool { return long[i].lines > long[j].lines })
	for _, l := range long {
		t.Errorf("%s:%d: %s is %d lines (at most %d)", l.pos.Filename, l.pos.Line, l.name, l.lines, MaxFuncLines)
	}
	if len(long) > 0 {
		t.Logf("%d functions over %d lines: split them into steps with names of their own", len(long), MaxFuncLines)
	}
}

!> host_utils: what the testbed hosts share that is not part of the bridge:
!> reading and writing a global state file in parallel, and stopping cleanly.
!>
!> State files are raw float64 (native byte order, no record markers) of the global array
!> state(nx, ny, nvar) in Fortran order, which is the Python array (nvar, ny, nx) in C order.
!> Each rank reads or writes only its own box with MPI-IO, so the file is the same for any
!> decomposition.
module host_utils
   use, intrinsic :: iso_fortran_env, only: error_unit, output_unit
   use mpi
   use lodas_bridge, only: lodas_dp, lodas_ctx, lodas_fail
   implicit none
   private
   public :: state_file_io, host_stop, host_log

contains

   !> Read (`write = .false.`) or write this rank's boxes of a global state file.
   !> `buf` is packed like the bridge: for v = 1..nvar, box counts(1,v) x counts(2,v).
   subroutine state_file_io(comm, path, write, nx, ny, starts, counts, buf, ierr_out, errmsg)
      integer, intent(in) :: comm
      character(len=*), intent(in) :: path
      logical, intent(in) :: write
      integer, intent(in) :: nx, ny, starts(:, :), counts(:, :)
      real(lodas_dp), intent(inout) :: buf(:)
      integer, intent(out) :: ierr_out                !< 0 on success
      character(len=*), intent(out) :: errmsg
      integer :: fh, ierr, v, j, k, amode, elen
      integer(kind=MPI_OFFSET_KIND) :: offset, fsize, need
      character(len=MPI_MAX_ERROR_STRING) :: estr

      ierr_out = 0
      errmsg = ''
      if (write) then
         amode = ior(MPI_MODE_WRONLY, MPI_MODE_CREATE)
      else
         amode = MPI_MODE_RDONLY
      end if
      call MPI_File_open(comm, path, amode, MPI_INFO_NULL, fh, ierr)
      if (ierr /= MPI_SUCCESS) then
         call MPI_Error_string(ierr, estr, elen, ierr)
         ierr_out = 1
         errmsg = 'cannot open state file '//trim(path)//': '//estr(1:elen)
         return
      end if
      need = int(nx, MPI_OFFSET_KIND)*ny*size(counts, 2)*8
      if (.not. write) then
         call MPI_File_get_size(fh, fsize, ierr)
         if (fsize /= need) then
            ierr_out = 1
            write (errmsg, '(3a,i0,a,i0,a,3(i0,a))') 'state file ', trim(path), ' has ', fsize, &
               ' bytes; expected ', need, ' (float64 array of shape (', nx, ', ', ny, ', ', size(counts, 2), '))'
            call MPI_File_close(fh, ierr)
            return
         end if
      else
         call MPI_File_set_size(fh, need, ierr)
      end if
      k = 1
      do v = 1, size(counts, 2)
         do j = 0, counts(2, v) - 1
            offset = 8_MPI_OFFSET_KIND*((int(v - 1, MPI_OFFSET_KIND)*ny + starts(2, v) - 1 + j)*nx &
                                        + starts(1, v) - 1)
            if (write) then
               call MPI_File_write_at(fh, offset, buf(k), counts(1, v), MPI_DOUBLE_PRECISION, &
                                      MPI_STATUS_IGNORE, ierr)
            else
               call MPI_File_read_at(fh, offset, buf(k), counts(1, v), MPI_DOUBLE_PRECISION, &
                                     MPI_STATUS_IGNORE, ierr)
            end if
            k = k + counts(1, v)
         end do
      end do
      call MPI_File_close(fh, ierr)
   end subroutine state_file_io

   !> Print a line from host rank 0 (`rank` is the rank in the host communicator).
   subroutine host_log(rank, msg)
      integer, intent(in) :: rank
      character(len=*), intent(in) :: msg
      if (rank == 0) then
         write (output_unit, '(a)') trim(msg)
         flush (output_unit)
      end if
   end subroutine host_log

   !> The host cannot go on: tell the driver (lodas_fail), print the message, finalize MPI and
   !> stop with a non-zero exit code.
   subroutine host_stop(ctx, rank, msg)
      type(lodas_ctx), intent(inout) :: ctx
      integer, intent(in) :: rank
      character(len=*), intent(in) :: msg
      integer :: ierr
      call lodas_fail(ctx, msg)
      if (rank == 0) then
         write (error_unit, '(2a)') 'host: error: ', trim(msg)
         flush (error_unit)
      end if
      call MPI_Finalize(ierr)
      stop 1
   end subroutine host_stop

end module host_utils
